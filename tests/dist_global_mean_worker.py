"""torchrun worker for tests/test_global_mean.py (2 ranks, gloo): the loss means are over the
global batch, so 2 ranks with half the batch each compute what 1 process computes on all of it.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_global_mean_worker.py MODEL OUT

Rank 0's rollouts are short and rank 1's long, so a mean of per-rank token means would weight
rank 0's tokens more and fail. For each aggregation (token_mean, seq_mean, constant) and both
training paths (shared-prefix, plain), under DDP (gradients all-reduced) and FSDP (reduce-
scattered shards), each rank's SFT and RL gradients must equal, and the rank means of the losses
must equal, what one process computes on the union of both ranks' batches. Any mismatch raises;
rank 0 writes OUT/report.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gtacore import models
from gtacore.config import LossArgs
from gtacore.distributed import DistInfo
from gtacore.packing import global_row_counts_
from gtacore.losses import Branch, forward_backward
from gtacore.packing import RL_ROW, SFT_ROW, pack_prompts, pack_rows
from gtacore.parallel import average_gradients, shard_model, whole

G, MAX_NEW = 2, 16  # completions per prompt; the constant normaliser's length


def rank_batch(rank: int, vocab: int):
    """Two prompts with G completions each: short ones on rank 0, long ones on rank 1."""
    g = torch.Generator().manual_seed(7 + rank)
    lengths = [(2, 3, 4, 2), (12, 15, 11, 14)][rank]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 7)]
    conts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    masks = [[j > 0 or c % 2 == 0 for j in range(len(x))] for c, x in enumerate(conts)]
    adv = torch.randn(len(conts), generator=g).tolist()
    sft = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in ((2, 3) if rank == 0 else (6, 5))]
    return prompts, conts, masks, adv, sft


def union(batches):
    """Concatenate ranks' batches; seq ids of continuations stay adjacent per prompt."""
    return tuple(sum((list(b[i]) for b in batches), []) for i in range(5))


def rank_mean(x: torch.Tensor, info) -> float:
    if info.distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= info.world_size
    return x.item()


def grads_and_losses(model, params, batch, agg, normalizer, shared_prefix, info):
    prompts, conts, masks, adv, sft = batch
    packed = pack_prompts(prompts, "cpu") if shared_prefix else prompts
    rl = pack_rows(packed, [r // G for r in range(len(conts))], conts, masks, RL_ROW, adv, "cpu")
    sf = pack_rows(packed, list(range(len(prompts))), sft, [[True] * len(s) for s in sft], SFT_ROW, None, "cpu")
    global_row_counts_([sf, rl], info)
    settings = LossArgs(agg=agg, loss_normalizer=normalizer).settings(1.0, len(prompts) * G * MAX_NEW,
                                                                     info.world_size)  # per-rank batch, as train.py
    out = []
    for r in forward_backward(model, params, [Branch(sf, settings), Branch(rl, settings)]):
        average_gradients(r.grads, info)  # DDP; FSDP's are reduce-scattered already
        out.append(([whole(g).clone() for g in r.grads], rank_mean(r.loss.loss.detach().double(), info)))
    return out


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info, alone = DistInfo(rank, world, 0, torch.device("cpu")), DistInfo()
    plain = models.load_pretrained(model_dir).train()
    fsdp = shard_model(models.load_pretrained(model_dir).train(), mixed_precision=False)
    vocab = plain.config.vocab_size
    batches = [rank_batch(r, vocab) for r in range(world)]
    report = {}
    for agg, normalizer in (("token_mean", 0.0), ("seq_mean", 0.0), ("constant", 0.0), ("constant", 37.0)):
        for shared_prefix in (True, False):
            expected = grads_and_losses(plain, list(plain.parameters()), union(batches), agg, normalizer,
                                        shared_prefix, alone)
            for name, model in (("ddp", plain), ("fsdp", fsdp)):
                got = grads_and_losses(model, list(model.parameters()), batches[rank], agg, normalizer, shared_prefix,
                                       info)
                key = f"{agg}{normalizer or ''}-{'prefix' if shared_prefix else 'plain'}-{name}"
                for kind, (g, l), (e, el) in zip(("sft", "rl"), got, expected):
                    diff = max((a - b).abs().max().item() for a, b in zip(g, e))
                    scale = max(b.abs().max().item() for b in e)
                    report[f"{key}-{kind}"] = {"grad_max_diff": diff, "grad_scale": scale, "loss": l, "union_loss": el}
                    assert scale > 0 and diff <= 1e-5 * scale, f"{key} {kind}: gradients differ by {diff} (scale {scale})"
                    assert abs(l - el) <= 1e-5 * abs(el), f"{key} {kind}: loss {l} != union {el}"
    if rank == 0:
        Path(out_dir, "report.json").write_text(json.dumps(report, indent=1))
    dist.barrier()  # gloo: a rank that leaves while its last send is in flight aborts the other
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
