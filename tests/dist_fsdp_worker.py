"""torchrun worker for tests/test_fsdp.py (2 ranks, gloo): FSDP2 gradients, constraint and checkpoints.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_fsdp_worker.py MODEL OUTDIR

Every rank draws its own batch. The sharded model's gradients (reduce-scattered,
averaged) must equal the mean of a plain model's gradients on both ranks'
batches; the constraint on the shards must give the plain constraint's result
and the same decisions on every rank; the sharded optimizer state must survive a
checkpoint onto 2 sharded ranks and onto 1 unsharded process, and a DDP-style
(one file) checkpoint must load onto the shards. Results go to OUTDIR/rank{r}.json;
any mismatch raises.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gtacore import models
from gtacore.checkpointing import load_trainer_state, save_checkpoint
from gtacore.config import LossArgs
from gtacore.distributed import DistInfo
from gtacore.losses import Branch, forward_backward
from gtacore.packing import RL_ROW, SFT_ROW, pack_prompts, pack_rows
from gtacore.parallel import full_state_dict, local, shard_model, whole
from gtacore.projection import apply_gradient_constraint


def batch(rank: int, vocab: int):
    g = torch.Generator().manual_seed(100 + rank)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 8)]
    pp = pack_prompts(prompts, "cpu")
    conts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (4, 6, 3, 5)]
    masks = [[j > 0 for j in range(len(c))] for c in conts]
    adv = torch.randn(4, generator=g).tolist()
    rl = pack_rows(pp, [0, 0, 1, 1], conts, masks, RL_ROW, adv, "cpu")
    sft = pack_rows(pp, [0, 1], conts[:2], masks[:2], SFT_ROW, None, "cpu")
    args = LossArgs()
    # No reference log-probs: no KL term (beta 0), as the old per-branch settings had it.
    no_kl = lambda normalizer: dataclasses.replace(args.settings(1.0, normalizer), beta=0.0)  # noqa: E731
    return [Branch(sft, no_kl(None)), Branch(rl, no_kl(50.0))]


def grads_of(model, rank, vocab):
    params = list(model.parameters())
    sft, rl = forward_backward(model, params, batch(rank, vocab))
    return params, sft.grads, rl.grads


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank, world, 0, torch.device("cpu"))
    out = Path(out_dir)
    report = {}

    # --- gradients and the constraint ---
    plain = models.load_pretrained(model_dir).train()
    vocab = plain.config.vocab_size
    per_rank = [grads_of(plain, r, vocab) for r in range(world)]
    params = per_rank[0][0]
    mean = lambda k, i: sum(pr[k][i] for pr in per_rank) / world  # noqa: E731
    sft_ref = [mean(1, i) for i in range(len(params))]
    rl_ref = [mean(2, i) for i in range(len(params))]

    sharded = shard_model(models.load_pretrained(model_dir).train(), mixed_precision=False)
    s_params, s_sft, s_rl = grads_of(sharded, rank, vocab)
    worst = max(max((whole(a) - b).abs().max().item() for a, b in zip(s_sft, sft_ref)),
                max((whole(a) - b).abs().max().item() for a, b in zip(s_rl, rl_ref)))
    report["grad_max_diff"] = worst
    assert worst <= 1e-6, f"sharded gradients differ from the plain mean by {worst}"

    stats = apply_gradient_constraint(s_params, s_sft, s_rl, "project", "per_param")
    ref_stats = apply_gradient_constraint(params, sft_ref, rl_ref, "project", "per_param")
    decisions = [torch.empty_like(stats.conflict) for _ in range(world)]
    dist.all_gather(decisions, stats.conflict.contiguous())
    assert all(torch.equal(decisions[0], d) for d in decisions), "ranks took different decisions"
    assert torch.equal(stats.conflict, ref_stats.conflict), "sharded decisions differ from the plain ones"
    assert 0 < int(stats.conflict.sum()) < len(params), "test data too weak: all or none in conflict"
    combined_diff = max((whole(p.grad) - q.grad).abs().max().item() for p, q in zip(s_params, params))
    report["combined_max_diff"] = combined_diff
    report["conflicts"] = stats.conflict.int().tolist()
    assert combined_diff <= 1e-6, f"constrained gradients differ by {combined_diff}"

    # --- optimizer state through checkpoints ---
    opt = torch.optim.AdamW(s_params, lr=1e-3)
    opt.step()
    opt.step()  # a second step so the moments are not a plain function of one gradient
    tok_dir = Path(model_dir)
    ck = out / "sharded-ckpt"
    save_checkpoint(ck, sharded, tok_dir, opt, {"step": 2}, info)
    want_full = {f"{i}.{k}": whole(v).clone() for i, (p, st) in enumerate(zip(s_params, opt.state.values()))
                 for k, v in st.items()}
    assert list(opt.state.keys()) == s_params

    # (a) onto 2 sharded ranks: each rank's rows, bit for bit
    again = shard_model(models.load_pretrained(ck).train(), mixed_precision=False)
    opt2 = torch.optim.AdamW(list(again.parameters()), lr=1e-3)
    assert load_trainer_state(ck, opt2)["step"] == 2
    for p_old, p_new in zip(s_params, again.parameters()):
        assert torch.equal(local(p_old), local(p_new)), "weights changed through the checkpoint"
        for k, v in opt.state[p_old].items():
            assert torch.equal(local(v), local(opt2.state[p_new][k])), f"optimizer {k} changed (2 -> 2 ranks)"

    # (b) onto one unsharded process (rank 0), and the HF weights are the whole tensors
    weights = full_state_dict(sharded, rank == 0)
    if rank == 0:
        single = models.load_pretrained(ck).train()
        for name, t in single.state_dict().items():
            assert torch.equal(t, weights[name]), f"checkpoint weight {name} differs"
        opt1 = torch.optim.AdamW(list(single.parameters()), lr=1e-3)
        load_trainer_state(ck, opt1)
        for i, p in enumerate(single.parameters()):
            for k, v in opt1.state[p].items():
                assert torch.equal(v, want_full[f"{i}.{k}"]), f"optimizer {i}.{k} changed (2 ranks -> 1)"
        # and a one-file (DDP) checkpoint of that state, for (c)
        save_checkpoint(out / "plain-ckpt", single, tok_dir, opt1, {"step": 2})
    dist.barrier()

    # (c) a DDP checkpoint onto 2 sharded ranks
    third = shard_model(models.load_pretrained(out / "plain-ckpt").train(), mixed_precision=False)
    opt3 = torch.optim.AdamW(list(third.parameters()), lr=1e-3)
    load_trainer_state(out / "plain-ckpt", opt3)
    for p_old, p_new in zip(s_params, third.parameters()):
        for k, v in opt.state[p_old].items():
            assert torch.equal(local(v), local(opt3.state[p_new][k])), f"optimizer {k} changed (1 -> 2 ranks)"

    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
