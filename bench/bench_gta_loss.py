"""Benchmark the GTA loss, forward + backward, over bf16 logits [N, V].

Rows: 1/8 SFT, 7/8 RL, beta = 0.04 (a reference model), token-mean aggregation. Methods: eager
PyTorch (`gta_loss_reference`), torch.compile of it, Liger-Kernel's Triton `triton_grpo_loss`
(RL rows only, [B, L+1, V] layout, in-place backward) when installed, and `gtacore.kernels.gta_loss`.
GB/s counts the floor traffic: the selected logits read twice and the gradient written once.
"""

import itertools

import torch
from common import measured_bandwidth_gbs, out_of_memory, parse_args, report, run_case, try_liger

from gtacore.kernels import LossSettings, gta_loss
from gtacore.kernels.gta_loss import gta_loss_reference

GRID = {"N": (4096, 16384, 65536), "V": (49152, 128256, 151936)}
TINY = {"N": (64,), "V": (1531,)}
SETTINGS = LossSettings(eps_low=0.2, eps_high=0.28, beta=0.04, temperature=0.7)
SEQUENCES = 8  # Liger's layout: B sequences of N / B tokens


def make_batch(N, V, device):
    torch.manual_seed(0)
    logits = torch.randn(N, V, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=device)
    row_kind = torch.full((N,), 2, device=device)
    row_kind[: N // 8] = 1
    old_logprobs = -10 + 0.3 * torch.randn(N, device=device)
    ref_logprobs = -10 + 0.3 * torch.randn(N, device=device)
    advantages = torch.randn(N, device=device)
    return logits, targets, row_kind, old_logprobs, advantages, ref_logprobs


def liger_method(batch):
    """Liger's RL-only loss on the same numbers, reshaped to its [B, L+1, V] layout."""
    triton_grpo_loss = try_liger("liger_kernel.transformers.grpo_loss", "triton_grpo_loss")
    if triton_grpo_loss is None or not torch.cuda.is_available():
        return None
    logits, targets, _, old, advantages, ref = batch
    B, V = SEQUENCES, logits.shape[1]
    L = logits.shape[0] // B
    liger_logits = torch.randn(B, L + 1, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids, old, ref = (t[: B * L].view(B, L) for t in (targets, old, ref))
    settings = dict(temperature=SETTINGS.temperature, beta=SETTINGS.beta, eps_low=SETTINGS.eps_low,
                    eps_high=SETTINGS.eps_high, inplace=True)

    def step():
        loss = triton_grpo_loss(liger_logits, old, ref, ids, advantages[:B], **settings)[0]
        return torch.autograd.grad(loss, liger_logits)

    return step


def main():
    args = parse_args(__doc__, GRID, TINY)
    bandwidth = measured_bandwidth_gbs(args.device)
    compiled = None if args.no_compile else torch.compile(gta_loss_reference)
    rows = []
    for N, V in itertools.product(args.grid["N"], args.grid["V"]):
        if out_of_memory(2 * N * V * 2, args.device):  # logits and their gradient in bf16
            continue
        batch = make_batch(N, V, args.device)
        logits = batch[0]

        def fwd_bwd(fn):
            def step():
                sft_loss, rl_loss, _ = fn(*batch, SETTINGS)
                return torch.autograd.grad(sft_loss + rl_loss, logits)

            return step

        methods = {"eager": fwd_bwd(gta_loss_reference), "compile": compiled and fwd_bwd(compiled),
                   "liger": liger_method(batch), "ours": fwd_bwd(gta_loss)}
        case = {"N": N, "V": V, "peak_rate": bandwidth}
        for method, fn in methods.items():
            if fn is not None:
                run_case(rows, case, method, fn, args, work=3 * N * V * logits.element_size(), unit_scale=1.0)
        del batch, logits, methods
    print(f"measured copy bandwidth: {bandwidth:.0f} GB/s")
    report(rows, args.csv, "GB/s")


if __name__ == "__main__":
    main()
