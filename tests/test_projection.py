"""Gradient constraint: the foreach fast path against a plain float64 loop, the geometry of
each mode, and identical decisions across ranks under torchrun (synchronized and sharded)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gtacore.projection import (
    GRANULARITIES,
    MODES,
    apply_gradient_constraint,
    constrain_gradients,
    gradient_statistics,
)

REPO = Path(__file__).resolve().parents[1]
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),  # products and results rounded to 8 bits
}

# Awkward shapes: a scalar, a single element, odd sizes. The None patterns: SFT only,
# RL only, neither (a frozen or unused parameter).
SHAPES = [(7, 5), (), (1,), (3, 1, 4), (13,), (2, 3), (4,), (5, 2)]
SFT_NONE, RL_NONE, BOTH_NONE = {5}, {6}, {7}


def random_grads(dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def draw(i, missing):
        return None if i in missing | BOTH_NONE else torch.randn(SHAPES[i], generator=gen, dtype=dtype)

    sft = [draw(i, SFT_NONE) for i in range(len(SHAPES))]
    rl = [draw(i, RL_NONE) for i in range(len(SHAPES))]
    return sft, rl


def clone(grads):
    return [None if g is None else g.clone() for g in grads]


def reference_constraint(sft_grads, rl_grads, mode, granularity):
    """The constraint as docs/method.md writes it, one parameter at a time, in float64."""
    P = len(sft_grads)
    sft, rl = [], []  # None -> zeros when the other gradient exists
    for s, r in zip(sft_grads, rl_grads):
        like = s if s is not None else r
        sft.append(None if like is None else (s if s is not None else torch.zeros_like(like)).double().flatten())
        rl.append(None if like is None else (r if r is not None else torch.zeros_like(like)).double().flatten())
    zero = torch.zeros((), dtype=torch.float64)
    dots = [zero if s is None else torch.dot(s, r) for s, r in zip(sft, rl)]
    sq_sft = [zero if s is None else torch.dot(s, s) for s in sft]
    sq_rl = [zero if r is None else torch.dot(r, r) for r in rl]
    D, S, R = sum(dots), sum(sq_sft), sum(sq_rl)
    conflict = [bool(D < 0)] * P if granularity == "global" else [bool(d < 0) for d in dots]
    combined, sft_after = [], []
    for i in range(P):
        if sft[i] is None:
            combined.append(None)
            continue
        s, r = sft[i], rl[i]
        d, rr = (D, R) if granularity == "global" else (dots[i], sq_rl[i])
        if mode == "gate" and conflict[i]:
            s = torch.zeros_like(s)
        elif mode == "project" and conflict[i]:
            s = s - (d / rr) * r
        sft_after.append(s)
        shape = (sft_grads[i] if sft_grads[i] is not None else rl_grads[i]).shape
        combined.append((s + r).view(shape))
    numel = [0 if s is None else s.numel() for s in sft]
    in_conflict = sum(n for n, c in zip(numel, conflict) if c)
    stats = dict(
        cosine=D / (S.sqrt() * R.sqrt()),
        conflict_fraction_params=torch.tensor(sum(conflict) / P, dtype=torch.float64),
        conflict_fraction_elements=torch.tensor(in_conflict / sum(numel), dtype=torch.float64),
        sft_norm=S.sqrt(),
        rl_norm=R.sqrt(),
        sft_norm_after=sum(torch.dot(s, s) for s in sft_after).sqrt(),
        conflict=torch.tensor(conflict),
    )
    return combined, stats


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(mode, granularity, dtype, seed):
    sft, rl = random_grads(dtype, seed)
    sft_before, rl_inputs = clone(sft), clone(rl)
    want, want_stats = reference_constraint(sft, rl, mode, granularity)
    got, stats = constrain_gradients(sft, rl_inputs, mode, granularity)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), i
        if w is not None:
            assert g.dtype == dtype and g.shape == w.shape
            torch.testing.assert_close(g.double(), w, **TOL[dtype])
        if rl_inputs[i] is not None:
            assert g is rl_inputs[i], "the combined gradient is written into the RL gradient"
    for s, s0 in zip(sft, sft_before):
        assert (s is None and s0 is None) or torch.equal(s, s0), "SFT gradients must not change"
    for name, w in want_stats.items():
        g = getattr(stats, name)
        if name == "conflict":
            assert torch.equal(g, w)
        else:
            assert g.shape == () and g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            torch.testing.assert_close(g.double(), w, **TOL[dtype])


def test_dot_is_accurate_when_norms_differ_by_orders_of_magnitude():
    # sum(p) from two L1 norms keeps a plain dot's accuracy; the polarization identity
    # (||a+b||^2 - ||a-b||^2)/4 would lose everything here in float32.
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(4099, generator=gen) * 1e4, torch.randn(17, 3, generator=gen) * 1e-3]
    b = [torch.randn(4099, generator=gen) * 1e-4, torch.randn(17, 3, generator=gen) * 1e3]
    stats = gradient_statistics(a, b, torch.float32)
    for i in range(2):
        x, y = a[i].double().flatten(), b[i].double().flatten()
        scale = (x * y).abs().sum()
        assert abs(stats[0, i].double() - torch.dot(x, y)) <= 1e-5 * scale
        torch.testing.assert_close(stats[1, i].double(), torch.dot(x, x), rtol=1e-5, atol=0)
        torch.testing.assert_close(stats[2, i].double(), torch.dot(y, y), rtol=1e-5, atol=0)


def test_chunked_products_give_the_same_statistics(monkeypatch):
    import gtacore.projection as projection

    sft, rl = random_grads(torch.float64, 12)
    whole = gradient_statistics(sft, rl, torch.float64)
    monkeypatch.setattr(projection, "PRODUCT_CHUNK", 13)  # groups of a few tensors; (7, 5) goes alone
    assert projection._chunks([0, 1, 2, 3, 4], sft, 13) == [[0], [1, 2], [3], [4]]  # 35, 1+1, 12, 13
    torch.testing.assert_close(gradient_statistics(sft, rl, torch.float64), whole, rtol=1e-14, atol=1e-14)


def conflicting_grads(seed, dtype=torch.float64):
    """Tensor 0 agrees strongly, tensor 1 conflicts, tensor 2 conflicts; global dot > 0."""
    gen = torch.Generator().manual_seed(seed)
    rl = [torch.randn(s, generator=gen, dtype=dtype) for s in [(6, 5), (9,), (3, 2)]]
    noise = [torch.randn(r.shape, generator=gen, dtype=dtype) * 0.3 for r in rl]
    sft = [3 * rl[0] + noise[0], -0.5 * rl[1] + noise[1], -0.2 * rl[2] + noise[2]]
    return sft, rl


def dot(a, b):
    return torch.dot(a.flatten(), b.flatten())


def test_project_per_param_makes_conflicting_tensors_orthogonal_and_leaves_the_rest():
    sft, rl = conflicting_grads(4)
    assert dot(sft[0], rl[0]) > 0 and dot(sft[1], rl[1]) < 0 and dot(sft[2], rl[2]) < 0
    got, stats = constrain_gradients(sft, clone(rl), "project", "per_param")
    sft_after = [g - r for g, r in zip(got, rl)]
    torch.testing.assert_close(sft_after[0], sft[0], rtol=1e-12, atol=1e-12)
    for i in (1, 2):
        assert abs(dot(sft_after[i], rl[i])) <= 1e-12 * sft[i].norm() * rl[i].norm()
        assert not torch.allclose(sft_after[i], sft[i])
    assert stats.conflict.tolist() == [False, True, True]
    assert torch.isclose(stats.conflict_fraction_params, torch.tensor(2 / 3, dtype=torch.float64))
    assert torch.isclose(stats.conflict_fraction_elements, torch.tensor(15 / 45, dtype=torch.float64))


def test_project_global_is_orthogonal_over_the_whole_model():
    sft, rl = conflicting_grads(5)
    sft = [-s for s in sft]  # now the whole-model dot is negative
    assert sum(dot(s, r) for s, r in zip(sft, rl)) < 0
    got, stats = constrain_gradients(sft, clone(rl), "project", "global")
    sft_after = [g - r for g, r in zip(got, rl)]
    total = sum(dot(s, r) for s, r in zip(sft_after, rl))
    scale = torch.cat([s.flatten() for s in sft]).norm() * torch.cat([r.flatten() for r in rl]).norm()
    assert abs(total) <= 1e-12 * scale
    assert dot(sft_after[1], rl[1]) > 1e-3, "one global coefficient: single tensors need not be orthogonal"
    assert stats.conflict.all() and stats.conflict_fraction_params == 1 and stats.conflict_fraction_elements == 1


def test_per_param_and_global_differ_where_only_one_tensor_conflicts():
    sft, rl = conflicting_grads(6)
    assert sum(dot(s, r) for s, r in zip(sft, rl)) > 0
    for mode in ("gate", "project"):
        per_param, _ = constrain_gradients(sft, clone(rl), mode, "per_param")
        whole, stats = constrain_gradients(sft, clone(rl), mode, "global")
        for g, s, r in zip(whole, sft, rl):  # no global conflict: the plain sum
            torch.testing.assert_close(g, s + r, rtol=1e-12, atol=1e-12)
        assert not stats.conflict.any() and stats.conflict_fraction_elements == 0
        torch.testing.assert_close(per_param[0], whole[0], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(per_param[1], whole[1])


def test_gate_drops_sft_where_it_conflicts():
    sft, rl = conflicting_grads(7)
    got, stats = constrain_gradients(sft, clone(rl), "gate", "per_param")
    torch.testing.assert_close(got[0], sft[0] + rl[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], rl[1]) and torch.equal(got[2], rl[2])
    assert stats.sft_norm_after.isclose(sft[0].norm())
    sft = [-s for s in sft]
    got, stats = constrain_gradients(sft, clone(rl), "gate", "global")
    assert all(torch.equal(g, r) for g, r in zip(got, rl))
    assert stats.cosine < 0 and stats.sft_norm_after == 0


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", MODES)
def test_zero_rl_gradient_gives_no_nan(mode, granularity):
    gen = torch.Generator().manual_seed(8)
    sft = [-torch.rand(s, generator=gen) - 0.1 for s in [(4, 3), (), (5,)]]  # negative: products are -0.0
    rl = [torch.zeros_like(s) for s in sft]
    rl[1] = torch.randn((), generator=gen).abs() + 0.1  # one tensor does conflict
    got, stats = constrain_gradients(sft, clone(rl), mode, granularity)
    for name, value in stats._asdict().items():
        assert torch.isfinite(value.double()).all(), name
    assert all(torch.isfinite(g).all() for g in got)
    if granularity == "per_param":  # ||g_rl|| = 0 on tensor 0: nothing to project onto, kept
        assert stats.conflict.tolist() == [False, True, False]
        torch.testing.assert_close(got[0], sft[0])
    all_zero, stats = constrain_gradients(sft, [torch.zeros_like(s) for s in sft], mode, granularity)
    assert stats.cosine == 0 and not stats.conflict.any()
    assert all(torch.equal(g, s) for g, s in zip(all_zero, sft))


def test_apply_sets_param_grads():
    sft, rl = random_grads(torch.float32, 9)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    want, _ = reference_constraint(sft, rl, "project", "per_param")
    rl_inputs = clone(rl)
    stats = apply_gradient_constraint(params, sft, rl_inputs, "project", "per_param")
    for i, (p, w) in enumerate(zip(params, want)):
        if w is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad.double(), w, **TOL[torch.float32])
            assert rl_inputs[i] is None or p.grad is rl_inputs[i]
    assert stats.conflict.shape == (len(SHAPES),)


def test_bad_inputs_raise():
    sft, rl = random_grads(torch.float32, 10)
    with pytest.raises(ValueError, match="mode"):
        constrain_gradients(sft, rl, "pcgrad")
    with pytest.raises(ValueError, match="granularity"):
        constrain_gradients(sft, rl, "project", "per_layer")
    with pytest.raises(ValueError, match="equally long"):
        constrain_gradients(sft, rl[:-1])
    with pytest.raises(ValueError, match="shape"):
        constrain_gradients([torch.zeros(3, 2)], [torch.zeros(2, 3)])


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync_on_cuda(mode, granularity):
    sft, rl = random_grads(torch.float32, 11)
    sft = [None if g is None else g.cuda() for g in sft]
    rl = [None if g is None else g.cuda() for g in rl]
    want, want_stats = reference_constraint(sft, rl, mode, granularity)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
    try:
        got, stats = constrain_gradients(sft, rl, mode, granularity)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g.double(), w, **TOL[torch.float32])
    assert torch.equal(stats.conflict.cpu(), want_stats["conflict"].cpu())


def _load_ranks(tmp_path, name):
    return [load_file(tmp_path / f"{name}_rank{r}.safetensors") for r in range(2)]


def _by_prefix(tensors, prefix):
    """{i: tensor} for keys '<prefix>.<i>'."""
    return {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.rsplit(".", 1)[0] == prefix}


def test_torchrun_ranks_take_the_same_decision(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "dist_projection_worker.py"), str(tmp_path)]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # (1) Local gradients differ per rank; after averaging, both ranks end identical, bit for bit.
    sync = _load_ranks(tmp_path, "sync")
    assert sync[0].keys() == sync[1].keys()
    for key in sync[0]:
        if not key.startswith("local."):
            assert torch.equal(sync[0][key], sync[1][key]), key
    assert not torch.equal(sync[0]["local.conflict"], sync[1]["local.conflict"]), \
        "test data too weak: rank-local decisions would agree by chance"
    sft = [_by_prefix(sync[0], "input.sft").get(i) for i in range(len(_by_prefix(sync[0], "input.rl")))]
    rl = [_by_prefix(sync[0], "input.rl")[i] for i in range(len(sft))]
    for mode in MODES:
        for granularity in GRANULARITIES:
            want, want_stats = reference_constraint(sft, rl, mode, granularity)
            got = _by_prefix(sync[0], f"{mode}.{granularity}.combined")
            for i, w in enumerate(want):
                torch.testing.assert_close(got[i].double(), w, **TOL[torch.float32])
            assert torch.equal(sync[0][f"{mode}.{granularity}.stat.conflict"], want_stats["conflict"])

    # (2) Sharded: each rank holds half of every parameter; concatenated shards equal the
    # unsharded result, and both ranks take the unsharded decision.
    shard = _load_ranks(tmp_path, "shard")
    full_sft = [_by_prefix(shard[0], "input.sft").get(i) for i in range(len(_by_prefix(shard[0], "input.rl")))]
    full_rl = [_by_prefix(shard[0], "input.rl")[i] for i in range(len(full_sft))]
    for granularity in GRANULARITIES:
        local = [s[f"local.{granularity}.conflict"] for s in shard]
        assert not torch.equal(local[0], local[1]), "test data too weak: shard-local decisions agree"
        for mode in MODES:
            want, want_stats = constrain_gradients(full_sft, clone(full_rl), mode, granularity)
            prefix = f"{mode}.{granularity}"
            for r in range(2):
                assert torch.equal(shard[r][f"{prefix}.stat.conflict"], want_stats.conflict)
            for name in ("cosine", "conflict_fraction_params", "conflict_fraction_elements", "sft_norm",
                         "rl_norm", "sft_norm_after"):
                assert torch.equal(shard[0][f"{prefix}.stat.{name}"], shard[1][f"{prefix}.stat.{name}"]), name
                torch.testing.assert_close(shard[0][f"{prefix}.stat.{name}"], getattr(want_stats, name), **TOL[torch.float32])
            parts = [_by_prefix(s, f"{prefix}.combined") for s in shard]
            for i, w in enumerate(want):
                got = torch.cat([parts[0][i], parts[1][i]]).view(w.shape)
                torch.testing.assert_close(got, w, **TOL[torch.float32])
