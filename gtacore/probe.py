"""The greedy probe: which label the policy prefers for each prompt of a fixed batch of training
prompts, from one teacher-forced pass (no generation), every --probe-every steps.

The step metrics count sampled answers, which can stay varied while the greedy answers users
deploy have all collapsed onto one label. The probe scores, for each probe prompt and each label,
the log-probability of the label-bearing part of the mode's completion: gta's guess
`<guess>LABEL</guess>` and sft's `LABEL` (the SFT targets, on the tokens of the label and the
closing tag), grpo's worked-example completion for the label. Each prompt's probe label is the
best-scoring one; `probe_share/LABEL` is each label's share of the probe batch and
`probe_majority_share` the largest, which the collapse warning watches beside the sampled answers.

Cost: one forward over the probe prompts (shared once by their L continuations) and P x L short
continuations, no backward; `time_probe` in metrics.jsonl.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .completions import format_target
from .losses import logprobs
from .packing import SFT_ROW, LossRows, pack_prompts, pack_rows
from .prompts import Prompt, sft_target_ids


@dataclass
class Probe:
    rows: LossRows  # P x L continuations, prompt-major: continuation b * L + k is label k for prompt b
    num_prompts: int
    labels: list[str]


def probe_examples(examples: list, n: int, seed: int) -> list:
    """The probe's training examples: a seeded sample, the same on every rank and at every step."""
    return random.Random(seed).sample(examples, min(n, len(examples)))


def make_probe(tok, prompts: list[Prompt], labels: list[str], mode: str, shared_prefix: bool, device) -> Probe:
    conts, masks, parent = [], [], []
    for b, prompt in enumerate(prompts):
        for label in labels:
            if mode == "grpo":  # no SFT target: the worked examples' completion
                ids = tok.encode(format_target(label, mode))
                mask = [True] * len(ids)
            else:
                ids, mask = sft_target_ids(tok, prompt.text, label, mode)
            conts.append(ids)
            masks.append(mask)
            parent.append(b)
    prompt_rows = pack_prompts([p.ids for p in prompts], device) if shared_prefix else [p.ids for p in prompts]
    return Probe(pack_rows(prompt_rows, parent, conts, masks, SFT_ROW, None, device), len(prompts), labels)


@torch.no_grad()
def probe_scores(model, probe: Probe) -> torch.Tensor:
    """[P, L] float32: each probe prompt's log-probability of each label's target (its loss tokens)."""
    P, L, rows = probe.num_prompts, len(probe.labels), probe.rows
    logp = logprobs(model, rows, 1.0)  # [M]
    # Every continuation has loss rows, so its dense sequence id is its index b * L + k.
    score = torch.zeros(P * L, dtype=torch.float32, device=logp.device).index_add_(0, rows.seq_ids, logp.float())
    return score.view(P, L)


def probe_shares(model, probe: Probe) -> dict[str, torch.Tensor]:
    """{"probe_share/LABEL": share of the probe prompts whose best label it is, ...,
    "probe_majority_share": the largest share} as 0-dim tensors (no host sync)."""
    P, L = probe.num_prompts, len(probe.labels)
    choice = probe_scores(model, probe).argmax(dim=1)  # [P]
    shares = torch.bincount(choice, minlength=L).float() / P  # [L]
    return {f"probe_share/{label}": shares[k] for k, label in enumerate(probe.labels)} | {
        "probe_majority_share": shares.max()}
