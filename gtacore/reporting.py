"""Live metrics: the scalars of metrics.jsonl and eval.jsonl, step-aligned, to TensorBoard and/or
Weights & Biases (`--report-to tensorboard,wandb`), from rank 0 only. metrics.jsonl stays the
record of truth; these are views of it.

Each integration is an optional extra, imported only when asked for: `pip install tensorboard`
(or gtacore[tensorboard]), `pip install wandb` (gtacore[wandb]). W&B honours its own
environment: WANDB_MODE=offline writes the run to OUTPUT_DIR/wandb with no network.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

INTEGRATIONS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name -> package


def report_to_problems(report_to: str) -> list[str]:
    """What is wrong with a --report-to value: unknown names, packages not installed."""
    problems = []
    for name in _names(report_to):
        if name not in INTEGRATIONS:
            problems.append(f"--report-to {name}: unknown; choose from none, {', '.join(INTEGRATIONS)} (comma-separated)")
        elif importlib.util.find_spec(INTEGRATIONS[name]) is None:
            problems.append(f"--report-to {name} needs the {INTEGRATIONS[name]} package: pip install {INTEGRATIONS[name]}")
    return problems


def _names(report_to: str) -> list[str]:
    return [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]


class Reporter:
    """log(scalars, step, prefix) to every integration asked for; does nothing when none is."""

    def __init__(self, report_to: str, out_dir: Path, config: dict, project: str | None, run_name: str | None):
        self.tensorboard = self.wandb = None
        names = _names(report_to)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(project=project or "gtacore", name=run_name or out_dir.name, dir=str(out_dir),
                                    config=config)

    def log(self, scalars: dict, step: int, prefix: str) -> None:
        """The finite numbers of `scalars` (nested dicts and strings are left to the JSON files)."""
        numbers = {f"{prefix}/{k}": float(v) for k, v in scalars.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
