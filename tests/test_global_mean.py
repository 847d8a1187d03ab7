"""The loss means are over the global batch: 2 ranks of batch B/2 == 1 process of batch B.

Before, token_mean divided by one rank's RL token count and the ranks' gradients were then
averaged: a mean of per-rank means, which weights a rank with short completions more. The
worker (tests/dist_global_mean_worker.py) gives rank 0 short and rank 1 long completions, so
that form fails by a wide margin; here the single-process arithmetic is checked too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gtacore.kernels import LossSettings, RowCounts, gta_loss
from tiny_models import write_hf_checkpoint

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_compute_the_union_loss_and_gradients(tmp_path):
    model = write_hf_checkpoint("llama-tied", tmp_path / "model")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_global_mean_worker.py"), str(model), str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report) == 4 * 2 * 2 * 2  # agg (constant twice: default and --loss-normalizer) x path x {ddp, fsdp} x {sft, rl}


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_row_counts_are_the_denominators(agg):
    # Two "ranks" of rows; each computes with the global counts / 2, their mean is the union's loss.
    torch.manual_seed(0)
    V = 11
    kinds = [torch.tensor([1, 2, 2, 0, 2]), torch.tensor([2, 1, 1, 2, 2, 2, 2, 2])]
    seqs = [torch.tensor([0, 0, 0, 0, 1]), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])]
    rows = [dict(logits=torch.randn(len(k), V, dtype=torch.float64), targets=torch.randint(0, V, (len(k),)),
                 row_kind=k, old_logprobs=-torch.rand(len(k), dtype=torch.float64) - 2,
                 advantages=torch.randn(len(k), dtype=torch.float64)) for k in kinds]
    whole = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    whole_seqs = torch.cat([seqs[0], seqs[1] + 2])
    expected = gta_loss(**whole, settings=LossSettings(agg=agg), seq_ids=whole_seqs)
    counts = RowCounts(sft_rows=3 / 2, rl_rows=9 / 2, rl_seqs=5 / 2)  # SFT rows, RL rows, RL sequences; over 2 ranks
    parts = [gta_loss(**r, settings=LossSettings(agg=agg), seq_ids=s, row_counts=counts) for r, s in zip(rows, seqs)]
    for name in ("sft_loss", "rl_loss"):
        got = sum(getattr(p, name) for p in parts) / 2
        assert torch.allclose(got, getattr(expected, name)), name
    # Without the global counts each part is its own mean, and their mean is not the union's.
    alone = [gta_loss(**r, settings=LossSettings(agg=agg), seq_ids=s) for r, s in zip(rows, seqs)]
    assert not torch.allclose(sum(p.rl_loss for p in alone) / 2, expected.rl_loss)


def test_seq_mean_takes_completions_without_rl_tokens():
    """A gta completion cut right after </guess> has no RL row: sequence ids stay dense (they index
    a [rows] buffer), and seq_mean averages over the sequences that have rows."""
    from gtacore.packing import RL_ROW, pack_rows

    conts, masks = [[5, 6], [7], [4], [3, 3]], [[False, False], [False], [True], [True, True]]
    rows = pack_rows([[1, 2], [1, 3]], [0, 0, 1, 1], conts, masks, RL_ROW, [0.5, -1.0, 2.0, 1.5], "cpu")
    assert rows.seq_ids.tolist() == [0, 1, 1]
    torch.manual_seed(0)
    logits, kind, adv = torch.randn(3, 11, dtype=torch.float64), torch.full((3,), 2), rows.advantages.double()
    old = torch.full((3,), -1.0, dtype=torch.float64)

    def loss(part, agg, **kw):
        return gta_loss(logits[part], rows.targets[part], kind[part], old[part], adv[part],
                        settings=LossSettings(agg=agg), **kw).rl_loss

    by_seq = loss(slice(0, 3), "seq_mean", seq_ids=rows.seq_ids)
    assert torch.allclose(by_seq, (loss(slice(0, 1), "token_mean") + loss(slice(1, 3), "token_mean")) / 2)
