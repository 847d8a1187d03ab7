"""A run's output folder: which checkpoints it holds, and removing old or unfinished ones.

    OUTPUT_DIR/checkpoint-STEP/   complete once its trainer_state.json is there (gtacore.checkpointing)
    OUTPUT_DIR/final/             the last checkpoint's weights, hard-linked

Keeping only the newest checkpoints (`remove_old_checkpoints`): a checkpoint is
first renamed to `.checkpoint-STEP.deleting-PID`, which `latest_checkpoint`
never takes, then removed; a kill in between leaves only that hidden folder,
and `remove_partial_checkpoints` clears it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable

import torch.distributed as dist

from .models.checkpoint import CheckpointError

STATE_JSON = "trainer_state.json"
DELETING = ".deleting-"  # ".checkpoint-STEP.deleting-PID": a checkpoint being deleted (see remove_old_checkpoints)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def _complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint (one with its trainer state), newest first."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_JSON).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda sp: sp[0], reverse=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    complete = _complete_checkpoints(output_dir)
    return complete[0][1] if complete else None


def remove_old_checkpoints(output_dir: str | Path, keep_last: int, protect: Iterable[Path | None] = ()) -> list[Path]:
    """Delete every complete checkpoint but the `keep_last` newest (by step) and those in
    `protect`; return the deleted ones. Folders without their trainer state are not touched.

    Crash-safe: each is first renamed to `.checkpoint-STEP.deleting-PID` (one atomic rename:
    from then on `latest_checkpoint` no longer sees it), then removed. A kill in between
    leaves that hidden folder, which `remove_partial_checkpoints` clears. A removal that
    fails (e.g. files held open on NFS) is reported and left for that cleanup; training goes on.
    """
    if keep_last <= 0:
        return []
    kept = {Path(p).absolute() for p in protect if p is not None}
    removed = []
    for _, p in _complete_checkpoints(output_dir)[keep_last:]:
        if p.absolute() in kept:
            continue
        doomed = p.with_name(f".{p.name}{DELETING}{os.getpid()}")
        _remove(doomed)  # a leftover of an earlier deletion under the same name
        os.rename(p, doomed)
        try:
            _remove(doomed, strict=True)
        except OSError as e:
            print(f"warning: could not delete {doomed} ({e}); it is removed when a run next starts in "
                  f"{p.parent}", file=sys.stderr, flush=True)
        removed.append(p)
    return removed


def _remove(p: Path, strict: bool = False) -> None:
    """Delete a folder, or only the link when it is a symlink (its target belongs to someone else)."""
    if p.is_symlink():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p, ignore_errors=not strict)


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Clean up after checkpoint writes that never finished (a killed run); return what was removed.

    `.NAME.tmp-*` folders are unfinished writes and `.NAME.state-shards` the staging
    of a sharded save: deleted. `.NAME.old-*` is the
    previous NAME, moved aside just before its replacement was moved in: if the
    kill came between the two moves, NAME is missing and the old folder goes back.
    `.NAME.deleting-*` is an old checkpoint whose deletion (`--save-total-limit`)
    never finished: deleted (a symlink only unlinked).
    """
    out = Path(output_dir)
    removed = []
    for p in (sorted(out.glob(".*.old-*")) + sorted(out.glob(".*.tmp-*")) + sorted(out.glob(".*.state-shards"))
              + sorted(out.glob(f".*{DELETING}*"))):
        name = p.name[1:].rsplit(".", 1)[0]  # ".checkpoint-4.old-123" -> "checkpoint-4"
        if not (p.is_dir() or p.is_symlink()) or not (name.startswith("checkpoint-") or name == "final"):
            continue
        if ".old-" in p.name and not (out / name).exists():
            p.rename(out / name)
            continue
        _remove(p)
        removed.append(p)
    return removed


# --- one run per folder ---
# A fresh run never writes into a folder that holds another run's logs, checkpoints or final/
# (its steps would mix into theirs, and --resume would later pick up their checkpoint): it
# stops, naming the ways on. --overwrite clears the old run's outputs first; --resume
# continues it.

LOGS = ("metrics.jsonl", "eval.jsonl")
OUTPUTS = (*LOGS, "config.json", "memory_estimate.json", "curves.png", "tensorboard", "wandb", "final")


# What a resumed run may change: how often it evaluates and saves, where it reports, how it
# runs; never what it computes (config keys "section.field"; listed in --resume's help).
RESUMABLE = ("optim.max_steps", "optim.max_bad_steps", "rollout.cuda_graph", *(f"run.{n}" for n in (
    "output_dir", "resume", "overwrite", "eval_every", "save_every", "save_total_limit", "save_dtype", "eval_batch_size",
    "device", "activation_checkpointing", "shard", "dist_timeout", "progress", "collapse_share", "collapse_steps",
    "report_to", "wandb_project", "run_name", "dry_run", "probe_every", "probe_prompts")))


def flag_name(key: str) -> str:
    """"optim.max_steps" -> "--max-steps"."""
    return "--" + key.split(".")[-1].replace("_", "-")


RESUME_HELP = ("continue the run in --output-dir from its last complete checkpoint. Only these flags may differ from "
               "the run's: " + ", ".join(flag_name(k) for k in RESUMABLE if k not in (
                   "run.output_dir", "run.resume", "run.overwrite", "run.dry_run"))
               + " (with --schedule cosine, a new --max-steps stretches the schedule)")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names it and the ways on."""


def check_model_dir(path: str | Path) -> None:
    """--model naming no folder, or a run's output folder instead of a checkpoint in it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--model {path}: no such folder (a Hugging Face-layout checkpoint folder)")
    if ((path / "final").is_dir() or (path / LOGS[0]).is_file()) and not any(path.glob("model*.safetensors")):
        raise RunFolderError(f"--model {path} is a run folder, not a checkpoint: use {path / 'final'} (its last "
                             "weights) or one of its checkpoint-STEP folders")


def run_outputs(output_dir: str | Path) -> list[Path]:
    """What a run wrote into the folder: logs, complete checkpoints, final/, plots. (A checkpoint
    folder without its trainer state is not a run's: nothing here touches it.)"""
    out = Path(output_dir)
    return [out / name for name in OUTPUTS if (out / name).exists()] + [p for _, p in _complete_checkpoints(out)]


def check_fresh_run_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse a fresh run into a folder that holds a run, unless --overwrite."""
    marks = [p.name for p in run_outputs(output_dir) if p.name in LOGS or p.name.startswith(("final", "checkpoint-"))]
    if marks and not overwrite:
        raise RunFolderError(
            f"--output-dir {output_dir} holds a run ({', '.join(marks[:4])}{', ...' if len(marks) > 4 else ''}): "
            "pass --resume to continue it, --overwrite to replace it, or another --output-dir")


def clear_run_dir(output_dir: str | Path) -> list[Path]:
    """Delete an earlier run's outputs (--overwrite); other files in the folder stay."""
    removed = run_outputs(output_dir)
    for p in removed:
        if p.is_dir() and not p.is_symlink():  # hidden first, as remove_old_checkpoints does: a kill
            doomed = p.with_name(f".{p.name}{DELETING}{os.getpid()}")  # midway leaves no half-checkpoint
            os.rename(p, doomed)
            shutil.rmtree(doomed)
        else:
            p.unlink()
    return removed


def trim_logs(output_dir: str | Path, step: int) -> None:
    """Keep the log records of steps <= `step` (a resumed run's checkpoint): the steps after it
    are run again, and their first records would otherwise stand beside the new ones."""
    for name in LOGS:
        path = Path(output_dir) / name
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(True) if _step(line) <= step]
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)  # a kill leaves the old log or the new one, never half of one


def _step(line: str) -> float:
    """A log record's step; a line a kill cut short counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def resume_changes(saved: dict, now: dict, saved_ranks: int | None, ranks: int) -> list[str]:
    """Where a resumed run's configuration (Config.to_dict()) differs from the saved run's outside
    RESUMABLE, as "--mode 'gta' -> 'grpo'". --batch-size is per rank: what must stay is the
    global batch, so a run may resume on other rank counts (an old checkpoint that did not record
    its ranks is taken to have had as many)."""
    changes = [f"{flag_name(f'{section}.{name}')} {old!r} -> {now[section][name]!r}"
               for section, fields in saved.items() for name, old in fields.items()
               if name in now.get(section, {}) and f"{section}.{name}" not in (*RESUMABLE, "rollout.batch_size")
               and now[section][name] != old]
    old_batch, new_batch, saved_ranks = saved.get("rollout", {}).get("batch_size"), now["rollout"]["batch_size"], \
        saved_ranks or ranks
    if old_batch is not None and old_batch * saved_ranks != new_batch * ranks:
        changes.append(f"--batch-size {old_batch} x {saved_ranks} rank(s) -> {new_batch} x {ranks} (the global batch)")
    return changes


def open_run_dir(output_dir: str | Path, config: dict, info, say) -> Path | None:
    """The checkpoint a run resumes from, or None for a fresh start (`config`: Config.to_dict();
    `info`: the ranks, a gtacore.distributed.DistInfo). A fresh run refuses a folder that holds another run unless
    --overwrite; --resume refuses flags that change what the run is and a --max-steps below the
    checkpoint's step, and ends a finished run at once (exit status 0: nothing to do)."""
    out, run = Path(output_dir), config["run"]
    if not run["resume"]:
        check_fresh_run_dir(out, run["overwrite"])
        return None
    if info.is_main:  # a checkpoint a kill left moved aside goes back before any rank picks one
        remove_partial_checkpoints(out)
    if info.distributed:
        dist.barrier()
    resume_from = latest_checkpoint(out)
    if resume_from is None:
        if (out / "final").is_dir() and not run["overwrite"]:
            raise RunFolderError(f"--resume: {out} holds final/ but no checkpoint to resume from; pass --overwrite "
                                 "to start afresh there, or another --output-dir")
        say(f"--resume: no complete checkpoint in {out}; starting fresh")
        return None
    state = json.loads((resume_from / STATE_JSON).read_text())
    changes = resume_changes(state.get("config", {}), config, state.get("world_size"), info.world_size)
    if changes:
        raise RunFolderError(f"--resume: {out} is a run with other settings ({'; '.join(changes)}). Resume it "
                             "with its own, or start a new run in another --output-dir")
    step, max_steps = state["step"], config["optim"]["max_steps"]
    if max_steps < step:
        raise RunFolderError(f"--resume: {resume_from} is at step {step}, past --max-steps {max_steps}")
    if max_steps == step and (out / "final").is_dir():
        say(f"--resume: {out} finished at step {step}; nothing to do (a larger --max-steps trains on)")
        raise SystemExit(0)
    return resume_from
