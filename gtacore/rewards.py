"""Rule-based rewards and group-normalized advantages (docs/method.md, "One training step", 2-3).

    r_i = w_format * format_ok_i + w_acc * (answer_i == y)
    A_i = (r_i - mean_G(r)) / (std_G(r) + eps)      or, Dr. GRPO (scale_std=False), r_i - mean_G(r)

Accuracy is judged on the answer alone, also when the format is broken (the formula has
no format gate): a correct answer inside a slightly malformed completion still scores w_acc.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .completions import Parsed, check_labels, parse_completion


def reward(parsed: Parsed, gold: str, w_format: float = 1.0, w_acc: float = 1.0) -> float:
    return w_format * float(parsed.format_ok) + w_acc * float(parsed.answer == gold)


# The user's own reward (--reward-fn module:function) replaces that sum:
#
#     def my_reward(parsed: list[Parsed], golds: list[str], labels: list[str]) -> list[float]: ...
#
# one float per completion (parsed[i].guess / .think / .answer / .format_ok), checked for length
# and finiteness. The module is imported as `python -m` would find it (the working directory
# first, then PYTHONPATH), or given as a file: path/to/rewards.py:function. Its signature is
# checked when it is loaded, before any model is.
RewardFn = Callable[[list[Parsed], list[str], list[str]], Sequence[float]]
SIGNATURE = "fn(parsed, golds, labels) -> one float per completion"


class RewardFnError(ValueError):
    """A --reward-fn that cannot be loaded or called, or whose output is not one finite number per completion."""


@functools.lru_cache(maxsize=None)
def load_reward_fn(spec: str) -> RewardFn:
    """'module:function' or 'path/to/file.py:function' -> the function (loaded once); a clear error otherwise."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise RewardFnError(f"--reward-fn {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            if loader is None or not Path(where).is_file():
                raise ImportError(f"no file {where}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:  # python train.py puts its own folder there
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except Exception as error:
        raise RewardFnError(f"--reward-fn {spec!r}: cannot import {where}: {type(error).__name__}: {error}") from error
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFnError(f"--reward-fn {spec!r}: {where} has no function {name}")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError:
        raise RewardFnError(f"--reward-fn {spec!r}: {name}{inspect.signature(fn)} cannot be called as "
                            f"{SIGNATURE}") from None
    except ValueError:  # no signature to read (some builtins): the first call tells
        pass
    return fn


def batch_rewards(
    texts: list[str], golds: list[str], labels: list[str], mode: str, w_format: float = 1.0, w_acc: float = 1.0,
    reward_fn: RewardFn | None = None, step: int | None = None,
) -> tuple[torch.Tensor, list[Parsed]]:
    """Parse and reward N decoded completions: (rewards [N] float32, parsed [N]). `step` names the
    training step in a reward function's errors."""
    if len(texts) != len(golds):
        raise ValueError(f"{len(texts)} completions but {len(golds)} gold labels")
    check_labels(labels)
    unknown = set(golds) - set(labels)
    if unknown:
        raise ValueError(f"gold labels {sorted(unknown)} are not in the label set")
    parsed = [parse_completion(t, labels, mode) for t in texts]
    if reward_fn is None:
        return torch.tensor([reward(p, y, w_format, w_acc) for p, y in zip(parsed, golds)], dtype=torch.float32), parsed
    name = getattr(reward_fn, "__qualname__", repr(reward_fn)) + (f" (step {step})" if step is not None else "")
    try:
        out = reward_fn(parsed, list(golds), list(labels))
    except Exception as error:
        raise RewardFnError(f"reward function {name} raised {type(error).__name__}: {error}") from error
    try:
        rewards = torch.as_tensor([float(r) for r in out], dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise RewardFnError(f"reward function {name}: must return one number per completion ({error})") from error
    if rewards.shape != (len(texts),):
        raise RewardFnError(f"reward function {name} returned {rewards.numel()} rewards for {len(texts)} completions")
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero()[0, 0].item()
        raise RewardFnError(f"reward function {name} returned {rewards[bad].item()} for completion {bad}: "
                            f"{texts[bad][:80]!r}; rewards must be finite")
    return rewards, parsed


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantages [B*G] from rewards [B*G]; the G samples of a prompt are contiguous.

    std is the unbiased sample std (torch.std, correction=1), as in TRL's GRPOTrainer, so that
    runs compare with it. A group whose rewards are all equal carries no signal and gets
    exactly zero (not round-off divided by eps); so does every group when G = 1.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B*G] with G = {group_size} dividing it, got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)  # [B, G]
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    adv = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # [B, 1]
    return adv.masked_fill(constant, 0.0).view(-1)  # [B*G]


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The share of groups (rewards [B*G], G contiguous) whose G rewards are all equal: their
    advantages are zero, so they carry no RL signal (a scalar; a tensor, so no host sync)."""
    r = rewards.view(-1, group_size)  # [B, G]
    return (r.amax(dim=1) == r.amin(dim=1)).float().mean()


def label_balance(golds: list[str], units: list[float], labels: list[str],
                  all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-rollout factors [N] for the advantages (--balance-labels) that give every gold label in
    the batch the same total weight in the RL loss, whatever its count.

    units[i]: rollout i's weight in the loss's aggregation before balancing, up to a constant
    (its RL tokens for token_mean and constant, 1 per sequence with RL tokens for seq_mean). With
    U_y the units of gold label y, U their sum and K the labels with U_y > 0, rollout i is scaled
    by U / (K * U_y(i)): label y's share of the policy-gradient term, U_y / U, becomes 1 / K. A
    batch with one label, or with equal units per label, is left as it is (factors 1).
    `all_reduce` sums the per-label units over ranks (DDP), so every rank scales by the global batch.
    """
    index = {label: k for k, label in enumerate(labels)}
    per_label = torch.zeros(len(labels), dtype=torch.float64)
    for gold, u in zip(golds, units):
        per_label[index[gold]] += u
    if all_reduce is not None:
        per_label = all_reduce(per_label)
    present = per_label > 0
    scale = torch.where(present, per_label.sum() / (present.sum() * per_label).clamp(min=1e-12), 0.0)  # [labels]
    return scale[[index[gold] for gold in golds]].float()
