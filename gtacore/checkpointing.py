"""Trainer checkpoints: the model in Hugging Face layout plus the trainer state, atomically.

    OUTPUT_DIR/checkpoint-STEP/
        config.json, model.safetensors, tokenizer files   <- transformers / vLLM load this
        trainer_state.safetensors                          <- optimizer tensors (DDP: rank 0 writes all)
        trainer_state-RRRRR-of-WWWWW.safetensors           <- or, with --shard fsdp, one per rank
        trainer_state.json                                 <- step, sampler position, optimizer groups, config

The folder is written under a temporary name and renamed into place, so a crash
(even SIGKILL) mid-write leaves only complete checkpoints under their real
names; `run_dir.latest_checkpoint` takes the newest one that has its trainer state, and
`run_dir.remove_partial_checkpoints` clears what a killed writer left behind. Nothing is
pickled: tensors go to safetensors, the rest to JSON.

Optimizer state of a sharded run: each rank saves its rows (dim 0) of every
moment tensor and records which rows they are. Loading reads, for each tensor,
the rows the loading rank holds from whichever files have them, so a run resumes
on any number of ranks, sharded or not (a DDP file is one shard holding all rows).

Sampling randomness needs no saved state: each step reseeds its generator from
(seed, step, rank), so a resumed run draws the same numbers as an unbroken one.

Weights saved in a lower precision than the parameters (`--save-dtype bfloat16`
with fp32 parameters): the HF files hold the rounded weights, and the trainer
state also holds the fp32 parameters ("master.{param index}", the optimizer's
rows), which `load_trainer_state` puts back, so resuming stays exact.

Which checkpoints a run folder holds, and removing old or unfinished ones: `gtacore.run_dir`.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from gtacore import models
from gtacore.models.checkpoint import CheckpointError

from .distributed import DistInfo, all_finite, assert_replicas_identical
from .parallel import as_param_shard, full_state_dict, is_sharded, local, local_rows
from .run_dir import STATE_JSON, remove_old_checkpoints

STATE_TENSORS = "trainer_state.safetensors"
MASTER = "master"  # trainer-state tensors "master.{param index}": the parameters, when the HF weights are cast


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row, or parameters not finite)."""


def _optimizer_tensors(optimizer: torch.optim.Optimizer, weights_dtype: torch.dtype | None = None,
                       ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], list]:
    """This rank's optimizer tensors ("optimizer.{param index}.{key}"), the rows each
    parameter's tensors cover, and the param groups. Parameters whose dtype differs from
    `weights_dtype` (the dtype of the HF weight files) are added as "master.{param index}"."""
    opt_state = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tensors = {}
    rows = {str(idx): list(local_rows(p)) for idx, p in enumerate(params)}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            tensors[f"optimizer.{idx}.{key}"] = local(torch.as_tensor(value)).detach().cpu().contiguous()
    if weights_dtype is not None:
        for idx, p in enumerate(params):
            if p.dtype != weights_dtype:
                tensors[f"{MASTER}.{idx}"] = local(p).detach().cpu().contiguous()
    return tensors, rows, opt_state["param_groups"]


def _weights_in(model, weights: dict[str, torch.Tensor] | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The HF tensors to write (`weights`, or the model's own), floating-point ones cast to `dtype` on the CPU."""
    tensors = dict(model.state_dict() if weights is None else weights)
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # not written (save_pretrained drops it too): no copy to make
    return {k: t.detach().to("cpu").to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}


def save_checkpoint(path: Path, model, tokenizer_dir, optimizer: torch.optim.Optimizer | None, state: dict,
                    info: DistInfo | None = None, dtype: str | torch.dtype | None = None) -> Path:
    """Write model + trainer state to `path` as one atomic folder.

    Unsharded models: call on rank 0 only. Sharded (FSDP) models: call on every
    rank; weights are gathered to rank 0, each rank writes its optimizer shard.
    dtype: the HF weight files' dtype (None: the parameters' own). Parameters of
    another dtype are also kept, exactly, in the trainer state (`MASTER`).
    """
    sharded = is_sharded(model)
    if info is None:  # a sharded model lives in a process group: every rank's part is needed
        info = DistInfo(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else DistInfo()
    dtype = None if dtype is None else models.parse_dtype(dtype)
    weights = full_state_dict(model, info.is_main) if sharded else None
    if dtype is not None and info.is_main:
        weights = _weights_in(model, weights, dtype)
    tensors, rows, groups = _optimizer_tensors(optimizer, dtype) if optimizer is not None else ({}, {}, [])
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


def save_training(path: Path, model, tokenizer_dir, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo,
                  dtype: str | torch.dtype | None = None, keep_last: int = 0, protect: Iterable[Path | None] = ()) -> list[Path]:
    """`save_checkpoint` from a training run (every rank calls it), after the checks that keep
    a bad state off the disk: finite parameters, and (DDP) the same parameters on every rank.

    keep_last > 0: once the new checkpoint is complete (and, sharded, every rank is past the
    write), rank 0 deletes all but the `keep_last` newest complete checkpoints, never `path`
    nor those in `protect` (`remove_old_checkpoints`). Returns what was deleted ([] off rank 0).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not all_finite([local(p) for p in params], info):
        raise TrainingError(f"the parameters are not finite at step {state['step']}; not writing {path}")
    if is_sharded(model):  # every rank takes part: weights are gathered, each writes its optimizer shard
        save_checkpoint(path, model, tokenizer_dir, optimizer, state, info, dtype)  # ends with a barrier
    else:
        assert_replicas_identical(params, info)
        if info.is_main:
            save_checkpoint(path, model, tokenizer_dir, optimizer, state, info, dtype)
    if not info.is_main or keep_last <= 0:
        return []
    return remove_old_checkpoints(path.parent, keep_last, protect=[path, *protect])


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore the optimizer from a checkpoint folder (any number of ranks, sharded
    or not, on either side); return the JSON trainer state. When the trainer state holds
    the parameters (`MASTER`: the HF weights were saved in a lower precision), they are
    copied into the optimizer's parameters, replacing the rounded weights loaded from the
    HF files; a checkpoint whose HF weights are of lower precision than the parameters
    and which lacks them is refused (resuming would round every weight)."""
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
        masters: dict[int, torch.Tensor] = {}
        for name, files_with in holders.items():
            chosen = [(readers[i], covers[i]) for i in files_with]
            if name.startswith(MASTER + "."):
                idx = int(name.split(".")[1])
                masters[idx] = _read_rows(chosen, idx, name, params[idx], path)
                continue
            _, idx, key = name.split(".", 2)
            param = params[int(idx)]
            per_param.setdefault(int(idx), {})[key] = _read_rows(chosen, int(idx), name, param, path)
    _check_weights_precision(path, params, masters)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    for group, settings in zip(optimizer.param_groups, live):
        group.update(settings)
    with torch.no_grad():
        for idx, master in masters.items():
            param = params[idx]
            if master.shape != param.shape or master.dtype != param.dtype:
                raise CheckpointError(f"{path}: the saved parameter {MASTER}.{idx} is {master.dtype} {tuple(master.shape)}, "
                                      f"the parameter {param.dtype} {tuple(param.shape)}")
            local(param).copy_(local(master))
    return state


def _check_weights_precision(path: Path, params: list[torch.Tensor], masters: dict[int, torch.Tensor]) -> None:
    """Refuse to resume from HF weights of lower precision than the parameters without the exact ones."""
    try:
        saved = json.loads((path / "config.json").read_text()).get("torch_dtype")
    except (OSError, ValueError, AttributeError):
        return  # no readable config.json: loading the weights reports it
    try:
        saved = models.parse_dtype(saved)
    except ValueError:
        return
    lossy = [i for i, p in enumerate(params) if p.is_floating_point() and torch.finfo(saved).bits < torch.finfo(p.dtype).bits
             and i not in masters]
    if lossy:
        raise CheckpointError(f"{path}: its weights are {saved} but the parameters are "
                              f"{params[lossy[0]].dtype}, and its trainer state lacks the exact ones ({MASTER}.{lossy[0]}, ...); "
                              "resuming would round every weight. Resume from a checkpoint written by train.py "
                              "(--save-dtype keeps the exact parameters in the trainer state), or start a new run "
                              "with --model on this folder")


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
