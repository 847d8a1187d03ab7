"""Benchmark selective log-probs over bf16 logits [N, V], every row selected.

Methods: eager PyTorch (`selective_logprobs_reference`), torch.compile of it, Liger-Kernel's
`fused_selective_log_softmax` (forward only; its [B, L+1, V] layout gives N-1 rows) when installed,
and `gtacore.kernels.selective_logprobs` (plus its in-place backward). Modes: "fwd" (old/ref log-probs,
no grad) and "fwd+bwd" (the policy). GB/s counts the floor traffic: forward reads the logits
once; forward + backward reads them twice and writes the gradient once.
"""

import itertools

import torch
from common import measured_bandwidth_gbs, out_of_memory, parse_args, report, run_case, try_liger

from gtacore.kernels import selective_logprobs
from gtacore.kernels.selective_logprobs import selective_logprobs_reference

GRID = {"N": (4096, 16384, 65536), "V": (49152, 128256, 151936)}
TINY = {"N": (64,), "V": (1531,)}
TEMPERATURE = 0.7


def forward_methods(args, logits, targets):
    compiled = None if args.no_compile else torch.compile(selective_logprobs_reference)
    liger = try_liger("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax")
    yield "eager", lambda: selective_logprobs_reference(logits, targets, TEMPERATURE)
    if compiled:
        yield "compile", lambda: compiled(logits, targets, TEMPERATURE)
    if liger and args.device == "cuda":
        yield "liger", lambda: liger(logits[None], targets[None, 1:], TEMPERATURE)
    yield "ours", lambda: selective_logprobs(logits, targets, TEMPERATURE)


def training_methods(args, logits, targets):
    compiled = None if args.no_compile else torch.compile(selective_logprobs_reference)
    upstream = torch.randn(logits.shape[0], device=logits.device)

    def fwd_bwd(fn, **kwargs):
        return lambda: torch.autograd.grad(fn(logits, targets, TEMPERATURE, **kwargs).logprobs, logits, upstream)

    yield "eager", fwd_bwd(selective_logprobs_reference)
    if compiled:
        yield "compile", fwd_bwd(compiled)
    yield "ours", fwd_bwd(selective_logprobs)
    yield "ours_inplace", fwd_bwd(selective_logprobs, inplace_backward=True)


def main():
    args = parse_args(__doc__, GRID, TINY)
    bandwidth = measured_bandwidth_gbs(args.device)
    rows = []
    for N, V in itertools.product(args.grid["N"], args.grid["V"]):
        if out_of_memory(2 * N * V * 2, args.device):  # logits and their gradient in bf16
            continue
        torch.manual_seed(0)
        logits = torch.randn(N, V, device=args.device, dtype=torch.bfloat16)
        targets = torch.randint(0, V, (N,), device=args.device)
        logit_bytes = logits.numel() * logits.element_size()
        for mode, methods, floor in (("fwd", forward_methods, 1), ("fwd+bwd", training_methods, 3)):
            logits.requires_grad_(mode != "fwd")
            case = {"mode": mode, "N": N, "V": V, "peak_rate": bandwidth}
            for method, fn in methods(args, logits, targets):
                with torch.set_grad_enabled(mode != "fwd"):
                    run_case(rows, case, method, fn, args, work=floor * logit_bytes, unit_scale=1.0)
        del logits
    print(f"measured copy bandwidth: {bandwidth:.0f} GB/s")
    report(rows, args.csv, "GB/s")


if __name__ == "__main__":
    main()
