"""Trainer checkpoints: the model in Hugging Face layout plus the trainer state, atomically.

    OUTPUT_DIR/checkpoint-STEP/
        config.json, model.safetensors, tokenizer files   <- transformers / vLLM load this
        trainer_state.safetensors                          <- optimizer tensors (DDP: rank 0 writes all)
        trainer_state-RRRRR-of-WWWWW.safetensors           <- or, with --shard fsdp, one per rank
        trainer_state.json                                 <- step, sampler position, optimizer groups, config

The folder is written under a temporary name and renamed into place, so a crash
(even SIGKILL) mid-write leaves only complete checkpoints under their real
names; `latest_checkpoint` takes the newest one that has its trainer state, and
`remove_partial_checkpoints` clears what a killed writer left behind. Nothing is
pickled: tensors go to safetensors, the rest to JSON.

Optimizer state of a sharded run: each rank saves its rows (dim 0) of every
moment tensor and records which rows they are. Loading reads, for each tensor,
the rows the loading rank holds from whichever files have them, so a run resumes
on any number of ranks, sharded or not (a DDP file is one shard holding all rows).

Sampling randomness needs no saved state: each step reseeds its generator from
(seed, step, rank), so a resumed run draws the same numbers as an unbroken one.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

import models
from models.checkpoint import CheckpointError

from .distributed import DistInfo, all_finite, assert_replicas_identical
from .parallel import as_param_shard, full_state_dict, is_sharded, local, local_rows

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row, or parameters not finite)."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], list]:
    """This rank's optimizer tensors ("optimizer.{param index}.{key}"), the rows each
    parameter's tensors cover, and the param groups."""
    opt_state = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tensors, rows = {}, {}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            tensors[f"optimizer.{idx}.{key}"] = local(torch.as_tensor(value)).detach().cpu().contiguous()
        rows[str(idx)] = list(local_rows(params[idx]))
    return tensors, rows, opt_state["param_groups"]


def save_checkpoint(path: Path, model, tokenizer_dir, optimizer: torch.optim.Optimizer | None, state: dict,
                    info: DistInfo | None = None) -> Path:
    """Write model + trainer state to `path` as one atomic folder.

    Unsharded models: call on rank 0 only. Sharded (FSDP) models: call on every
    rank; weights are gathered to rank 0, each rank writes its optimizer shard.
    """
    sharded = is_sharded(model)
    if info is None:  # a sharded model lives in a process group: every rank's part is needed
        info = DistInfo(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else DistInfo()
    weights = full_state_dict(model, info.is_main) if sharded else None
    tensors, rows, groups = _optimizer_tensors(optimizer) if optimizer is not None else ({}, {}, [])
    staging = path.parent / f".{path.name}.state-shards"
    names = [STATE_TENSORS]
    if sharded and info.world_size > 1:
        names = [f"trainer_state-{r:05d}-of-{info.world_size:05d}.safetensors" for r in range(info.world_size)]
        if info.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        save_file(tensors, str(staging / names[info.rank]), metadata={"rows": json.dumps(rows)})
        dist.barrier()

    def write_state(tmp: Path) -> None:
        if len(names) == 1:
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"rows": json.dumps(rows)})
        else:
            for name in names:
                shutil.move(staging / name, tmp / name)
        # Written last: its presence marks the trainer state as complete.
        (tmp / STATE_JSON).write_text(json.dumps({**state, "state_files": names, "optimizer_param_groups": groups},
                                                 indent=2, default=list))

    if info.is_main:
        models.save_pretrained(model, path, tokenizer_dir=tokenizer_dir, write_extra=write_state, state_dict=weights)
        shutil.rmtree(staging, ignore_errors=True)
    if sharded and info.world_size > 1:
        dist.barrier()  # nobody moves on (or exits) before the checkpoint exists
    return path


def save_training(path: Path, model, tokenizer_dir, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    """`save_checkpoint` from a training run (every rank calls it), after the checks that keep
    a bad state off the disk: finite parameters, and (DDP) the same parameters on every rank."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not all_finite([local(p) for p in params], info):
        raise TrainingError(f"the parameters are not finite at step {state['step']}; not writing {path}")
    if is_sharded(model):  # every rank takes part: weights are gathered, each writes its optimizer shard
        save_checkpoint(path, model, tokenizer_dir, optimizer, state, info)
        return
    assert_replicas_identical(params, info)
    if info.is_main:
        save_checkpoint(path, model, tokenizer_dir, optimizer, state, info)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    best, best_step = None, -1
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_JSON).is_file() and int(m.group(1)) > best_step:
            best, best_step = p, int(m.group(1))
    return best


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Clean up after checkpoint writes that never finished (a killed run); return what was removed.

    `.NAME.tmp-*` folders are unfinished writes and `.NAME.state-shards` the staging
    of a sharded save: deleted. `.NAME.old-*` is the
    previous NAME, moved aside just before its replacement was moved in: if the
    kill came between the two moves, NAME is missing and the old folder goes back.
    """
    out = Path(output_dir)
    removed = []
    for p in sorted(out.glob(".*.old-*")) + sorted(out.glob(".*.tmp-*")) + sorted(out.glob(".*.state-shards")):
        name = p.name[1:].rsplit(".", 1)[0]  # ".checkpoint-4.old-123" -> "checkpoint-4"
        if not p.is_dir() or not (name.startswith("checkpoint-") or name == "final"):
            continue
        if ".old-" in p.name and not (out / name).exists():
            p.rename(out / name)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore the optimizer from a checkpoint folder (any number of ranks, sharded
    or not, on either side); return the JSON trainer state."""
    state = json.loads((path / STATE_JSON).read_text())
    files = state.pop("state_files", [STATE_TENSORS])
    groups = state.pop("optimizer_param_groups")
    if optimizer is None:
        return state
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: trainer state file {name} is missing")
    # How AdamW runs (fused, foreach, ...) belongs to this machine, not to the one that saved.
    live = [{k: g[k] for k in ("fused", "foreach", "capturable", "differentiable") if k in g} for g in optimizer.param_groups]
    with ExitStack() as stack:
        readers = [stack.enter_context(safe_open(str(path / name), framework="pt", device="cpu")) for name in files]
        covers = [json.loads((r.metadata() or {}).get("rows", "{}")) for r in readers]
        holders: dict[str, list[int]] = {}  # tensor name -> the files holding it
        for i, r in enumerate(readers):
            for key in r.keys():
                holders.setdefault(key, []).append(i)
        per_param: dict[int, dict] = {}
        for name, files_with in holders.items():
            _, idx, key = name.split(".", 2)
            param = params[int(idx)]
            chosen = [(readers[i], covers[i]) for i in files_with]
            per_param.setdefault(int(idx), {})[key] = _read_rows(chosen, int(idx), name, param, path)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    for group, settings in zip(optimizer.param_groups, live):
        group.update(settings)
    return state


def _read_rows(holders, idx: int, name: str, param: torch.Tensor, path: Path) -> torch.Tensor:
    """The rows of tensor `name` that this rank's shard of `param` covers, from the (reader, cover) pairs holding it."""
    first = holders[0][0].get_slice(name)
    if len(first.get_shape()) == 0:  # a scalar (AdamW's step count): the same in every file
        return holders[0][0].get_tensor(name).to(param.device)
    want_lo, want_hi = local_rows(param)
    pieces, got = [], 0
    for reader, cover in holders:
        sl = reader.get_slice(name)
        lo, hi = cover.get(str(idx), [0, sl.get_shape()[0]])
        a, b = max(lo, want_lo), min(hi, want_hi)
        if a < b:
            pieces.append(sl[a - lo : b - lo])
            got += b - a
    if got != want_hi - want_lo:
        raise CheckpointError(f"{path}: the optimizer state {name} covers {got} of the rows {want_lo}:{want_hi} this rank needs")
    rows = torch.cat(pieces) if pieces else first[0:0]
    if tuple(rows.shape[1:]) != tuple(param.shape[1:]):
        raise CheckpointError(f"{path}: the optimizer state {name} has rows of shape {tuple(rows.shape[1:])}, "
                              f"the parameter {tuple(param.shape[1:])}")
    return as_param_shard(param, rows.to(param.device))
