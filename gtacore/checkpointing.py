"""Trainer checkpoints: the model in Hugging Face layout plus the trainer state, atomically.

    OUTPUT_DIR/checkpoint-STEP/
        config.json, model.safetensors, tokenizer files   <- transformers / vLLM load this
        trainer_state.safetensors                          <- optimizer tensors
        trainer_state.json                                 <- step, sampler position, optimizer groups, config

The folder is written under a temporary name and renamed into place, so a crash
(even SIGKILL) mid-write leaves only complete checkpoints under their real
names; `latest_checkpoint` takes the newest one that has its trainer state.
Nothing is pickled: tensors go to safetensors, the rest to JSON.

Sampling randomness needs no saved state: each step reseeds its generator from
(seed, step, rank), so a resumed run draws the same numbers as an unbroken one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import models

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def save_checkpoint(path: Path, model, tokenizer_dir, optimizer: torch.optim.Optimizer | None, state: dict) -> Path:
    """Write model + trainer state to `path` as one atomic folder."""

    def write_state(tmp: Path) -> None:
        tensors, groups = {}, []
        if optimizer is not None:
            opt_state = optimizer.state_dict()
            for idx, per_param in opt_state["state"].items():
                for key, value in per_param.items():
                    tensors[f"optimizer.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
            groups = opt_state["param_groups"]
        save_file(tensors, str(tmp / STATE_TENSORS))
        # Written last: its presence marks the trainer state as complete.
        (tmp / STATE_JSON).write_text(json.dumps({**state, "optimizer_param_groups": groups}, indent=2, default=list))

    return models.save_pretrained(model, path, tokenizer_dir=tokenizer_dir, write_extra=write_state)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    best, best_step = None, -1
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file() and int(m.group(1)) > best_step:
            best, best_step = p, int(m.group(1))
    return best


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore the optimizer from a checkpoint folder; return the JSON trainer state."""
    state = json.loads((path / STATE_JSON).read_text())
    groups = state.pop("optimizer_param_groups")
    if optimizer is not None:
        device = optimizer.param_groups[0]["params"][0].device
        per_param: dict[int, dict] = {}
        for name, t in load_file(str(path / STATE_TENSORS), device=str(device)).items():
            _, idx, key = name.split(".", 2)
            per_param.setdefault(int(idx), {})[key] = t
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    return state
