"""A whole GTA step and a short evaluation on FakeTensors under bf16 autocast: shapes, devices
and dtypes checked everywhere, no value computed.

With device "cuda" every tensor is a fake CUDA tensor, so a CPU tensor meeting a CUDA one, or a
shape or dtype error that an op's fake kernel checks, fails here as it would on a GPU. (Not every
dtype rule lives in the fake kernels: index_copy_'s is in the real one, which is why the real
bf16 step runs in tests/test_precision.py, under CPU autocast.) That
needs a CUDA build of torch (no GPU): a CPU-only build cannot run on fake CUDA tensors the ops
that need a CUDA device guard (module initialisation, index_copy_, autograd), so there it is
skipped, and bench/gpu_check.py runs it on the GPU machine. With device "cpu" the same step runs
here on fake CPU tensors under CPU autocast: it proves the step has no hidden host sync.

What cannot run on fake tensors is isolated, each in one place:
- decoding's host checks (all rows finished? stop strings?): check_every is past the last step;
- the rollout's decode to text and the rewards (they read token values): the completions are
  made on the host with the shapes generate returned;
- the non-finite check before the optimizer step (one bool() on the norm): the clip is applied
  without it, as train_step does once the check passed.
"""

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gtacore import models
from gtacore.losses import Branch, forward_backward, logprobs
from gtacore.packing import RL_ROW, SFT_ROW, pack_prompts, pack_rows
from gtacore.projection import apply_gradient_constraint
from gtacore.kernels import LossSettings
from gtacore.models.generate import SamplingParams, generate

CONFIG = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True)  # GQA and Qwen3's q/k norms
B, G, P, T = 2, 3, 7, 5


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.backends.cuda.is_built(),
                                                  reason="fake CUDA tensors need a CUDA build of torch (module docstring)")),
])
def test_gta_step_and_evaluation_on_fake_tensors(device):
    dev = torch.device(device)
    prompts = [[3 + i + b for i in range(P - b)] for b in range(B)]  # host lists, as the prompt builder makes them
    with FakeTensorMode(allow_non_fake_inputs=False):
        with dev:
            model = models.Decoder(models.ModelConfig.from_dict(CONFIG))
            model.reset_rope()
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        autocast = torch.autocast(device, dtype=torch.bfloat16)
        with autocast:  # rollout
            gen = generate(model, prompts, SamplingParams(max_new_tokens=T, num_samples=G, check_every=T + 1), [], 0)
        assert gen.tokens.shape == (B * G, T) and gen.tokens.device.type == device
        assert gen.logprobs.dtype == torch.float32

        conts = [[4 + (r + j) % 7 for j in range(T)] for r in range(B * G)]  # stand-ins of the sampled tokens
        shared = pack_prompts(prompts, dev)
        rl = pack_rows(shared, [r // G for r in range(B * G)], conts, [[True] * T] * (B * G), RL_ROW, [0.5, -0.5, 0.0] * B, dev)
        sft = pack_rows(shared, list(range(B)), [c[:3] for c in conts[::G]], [[True] * 3] * B, SFT_ROW, None, dev)
        settings = LossSettings(beta=0.04)
        with autocast:  # reference and old log-probs, then one update's two backwards
            rl_branch = Branch(rl, settings, old_logprobs=logprobs(model, rl, 1.0), ref_logprobs=logprobs(model, rl, 1.0))
            assert rl_branch.old_logprobs.dtype == torch.float32 and rl_branch.old_logprobs.shape == rl.targets.shape
            results = forward_backward(model, params, [Branch(sft, replace(settings, temperature=1.0, beta=0.0)), rl_branch])
        for result in results:
            assert all(g is None or (g.dtype == p.dtype and g.device == p.device) for g, p in zip(result.grads, params))
        apply_gradient_constraint(params, results[0].grads, results[1].grads)
        grads = [p.grad for p in params if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 for g in grads)  # fp32 master gradients under bf16 compute
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, (1.0 / (norm + 1e-6)).clamp(max=1.0))
        optimizer.step()
        assert all(p.dtype == torch.float32 and p.device.type == device for p in params)

        with autocast:  # evaluation: greedy, no log-probs
            greedy = generate(model, prompts, SamplingParams(max_new_tokens=T, temperature=0.0, check_every=T + 1), [], 0,
                              with_logprobs=False)
        assert greedy.tokens.shape == (B, T) and greedy.logprobs is None
