"""Benchmark LM head + GTA loss, forward + backward, from bf16 hidden [N, D] and weight [V, D].

Methods: eager PyTorch (matmul + `gta_loss_reference`), torch.compile of it, matmul + our
`gtacore.kernels.gta_loss` ("unfused"), `gtacore.kernels.fused_linear_gta_loss` ("fused", no [N, V]), and when
installed Liger-Kernel's `LigerFusedLinearGRPOLoss` (same loss, its chunked torch.compile path)
and `LigerFusedLinearCrossEntropyLoss` (plain cross-entropy on every row: the cost of the fusion
without the RL terms). TFLOP/s counts the three LM-head matmuls (6 N V D) against a measured
bf16 matmul peak; peak memory is the point of the fused path.
"""

import itertools

import torch
from common import measured_matmul_tflops, out_of_memory, parse_args, report, run_case, try_liger

from gtacore.kernels import LossSettings, fused_linear_gta_loss, gta_loss
from gtacore.kernels.gta_loss import gta_loss_reference

GRID = {"N": (4096, 16384, 65536), "V": (49152, 128256, 151936), "D": (576, 2048, 3584)}
TINY = {"N": (64,), "V": (1531,), "D": (32,)}
SETTINGS = LossSettings(eps_low=0.2, eps_high=0.28, beta=0.04, temperature=0.7)
SEQUENCES = 8  # Liger's layout: B sequences of N / B tokens


def make_batch(N, V, D, device):
    torch.manual_seed(0)
    hidden = torch.randn(N, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, D, device=device) / D**0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    row_kind = torch.full((N,), 2, device=device)
    row_kind[: N // 8] = 1
    old_logprobs = -10 + 0.3 * torch.randn(N, device=device)
    ref_logprobs = -10 + 0.3 * torch.randn(N, device=device)
    advantages = torch.randn(N, device=device)
    return hidden, weight, targets, row_kind, old_logprobs, advantages, ref_logprobs


def liger_methods(batch):
    if not torch.cuda.is_available():
        return {}
    hidden, weight, targets, _, old, advantages, ref = batch
    B, L = SEQUENCES, hidden.shape[0] // SEQUENCES
    methods = {}
    grpo = try_liger("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
    if grpo is not None:
        loss_fn = grpo(beta=SETTINGS.beta, epsilon_low=SETTINGS.eps_low, epsilon_high=SETTINGS.eps_high,
                       temperature=SETTINGS.temperature, loss_type="bnpo")
        ids, mask = targets[: B * L].view(B, L), torch.ones(B, L, device="cuda")
        methods["liger_grpo"] = lambda: torch.autograd.grad(
            loss_fn(hidden[: B * L].view(B, L, -1), weight, ids, mask, advantages[:B],
                    ref_per_token_logps=ref[: B * L].view(B, L), old_per_token_logps=old[: B * L].view(B, L))[0],
            (hidden, weight),
        )
    flce = try_liger("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
    if flce is not None:
        ce = flce()
        methods["liger_ce"] = lambda: torch.autograd.grad(ce(weight, hidden, targets), (hidden, weight))
    return methods


def main():
    args = parse_args(__doc__, GRID, TINY)
    peak_tflops = measured_matmul_tflops(args.device, torch.bfloat16)
    compiled = None if args.no_compile else torch.compile(gta_loss_reference)
    rows = []
    for N, V, D in itertools.product(args.grid["N"], args.grid["V"], args.grid["D"]):
        if out_of_memory(4 * (N + V) * D * 2, args.device):  # hidden, weight and their grads
            continue
        batch = make_batch(N, V, D, args.device)
        hidden, weight, *rest = batch

        def unfused(loss_fn):
            def step():
                sft_loss, rl_loss, _ = loss_fn(hidden @ weight.T, *rest, SETTINGS)
                return torch.autograd.grad(sft_loss + rl_loss, (hidden, weight))

            return step

        def fused():
            return torch.autograd.grad(fused_linear_gta_loss(*batch, SETTINGS).loss, (hidden, weight))

        methods = {"eager": unfused(gta_loss_reference), "compile": compiled and unfused(compiled),
                   "unfused": unfused(gta_loss), "fused": fused, **liger_methods(batch)}
        case = {"N": N, "V": V, "D": D, "peak_rate": peak_tflops}
        for method, fn in methods.items():
            if fn is not None:
                run_case(rows, case, method, fn, args, work=6 * N * V * D, unit_scale=1e-3)
        del batch, hidden, weight, rest, methods
    print(f"measured bf16 matmul peak: {peak_tflops:.4g} TFLOP/s")
    report(rows, args.csv, "TFLOP/s")


if __name__ == "__main__":
    main()
