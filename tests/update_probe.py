"""Record the gradient each optimizer update applies, for the tests of mu > 1 (tests/test_updates.py).

`record_updates()` wraps AdamW.step so that every call appends the gradient it is about to
apply, flattened to one float64 vector of this rank's tensors (whole gradients under DDP, the
local shards under FSDP). `scripted_rewards()` replaces the rule-based rewards by a fixed
function of each completion's text, so that grpo on a random tiny model (which never earns a
reward) still has non-zero advantages and a gradient to compare.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager

import torch

import train
from gtacore.parallel import local


@contextmanager
def record_updates():
    applied: list[torch.Tensor] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [local(p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        applied.append(torch.cat([g.detach().double().reshape(-1) for g in grads]))
        return step(self, *args, **kwargs)

    torch.optim.AdamW.step = recording_step
    try:
        yield applied
    finally:
        torch.optim.AdamW.step = step


@contextmanager
def scripted_rewards():
    rule = train.batch_rewards

    def rewards(texts, golds, labels, mode, w_format, w_acc, reward_fn=None, step=None):
        _, parsed = rule(texts, golds, labels, mode, w_format, w_acc, reward_fn, step=step)
        return torch.tensor([zlib.crc32(t.encode()) % 3 / 2 for t in texts], dtype=torch.float32), parsed

    train.batch_rewards = rewards
    try:
        yield
    finally:
        train.batch_rewards = rule
