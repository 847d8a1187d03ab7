"""TRL's GRPOTrainer on bench_vs_trl.py's configuration, timed stage by stage; run by bench_vs_trl.py.

Writes OUT/metrics.jsonl (one line per optimizer step) and OUT/summary.json. The prompts are gtacore's
grpo prompts, given to TRL as chat messages in our sampler's order (shuffle_dataset=False), so that step k
trains on the same 4 prompts as train.py's step k; every prompt TRL tokenizes is checked to give exactly
the token ids of `gtacore.rollout.make_prompts`. Completions are decoded with our tokenizer and scored by
`gtacore.rewards.batch_rewards` in grpo mode, as in train.py.

Stages and the TRL 1.16.0 code each one times (wrappers on the trainer instance, perf_counter, with a
device sync on CUDA):
    generation       GRPOTrainer._generate_and_score_completions minus the no-grad log-prob calls inside
                     it: chat template and tokenization (_tokenize_prompts), HF `model.generate` on
                     B*G left-padded rows (each prompt prefilled G times) with a DynamicCache, decoding,
                     our reward, group advantages, padding and metric logging
    ref_logprobs     GRPOTrainer._get_per_token_logps_and_entropies(self.ref_model, ...) under no_grad:
                     the reference forward through TRL's fused LM head (log-probs without [B, T, V] logits)
    old_logprobs     the same call with the policy; TRL skips it when num_iterations = 1 and generation
                     is aligned with the optimizer step, as here (so it stays 0; added to ref if not)
    policy_forward   GRPOTrainer.compute_loss: the policy forward with grad (fused LM head, log-probs and
                     entropy) and the clipped loss with the k3 KL term
    backward         accelerator.backward(loss) in Trainer.training_step
    optimizer        from entering Trainer._clip_grad_norm to the on_optimizer_step callback: gradient-norm
                     clipping, its read-back, and optimizer.step()
    step             between consecutive on_step_end callbacks (the first from on_train_begin): the whole
                     step, with data loading, lr scheduler, zero_grad and TRL's per-step logging
"""

import argparse
import functools
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_vs_trl import REPO, SETTINGS

from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from gtacore.config import RolloutArgs
from gtacore.run_data import load_dataset_from_args
from gtacore.prompts import build_messages
from gtacore.rewards import batch_rewards
from gtacore.prompts import make_prompts
from gtacore.batches import BatchSampler
from gtacore.models.tokenizer import Tokenizer

CUDA = torch.cuda.is_available()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder (HF layout)")
    parser.add_argument("--data", type=Path, default=REPO / "gtacore" / "bundled" / "emotion_train.jsonl")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def peak_memory_gib() -> float:
    """train.py's `peak_memory_gb` quantity, in GiB."""
    if CUDA:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def gtacore_prompts(args, tok: Tokenizer):
    """The examples of each step in train.py's order, their chat messages, and the prompt ids train.py uses."""
    s = SETTINGS
    # As train.py loads --data: the worked examples are drawn from the training file itself.
    data, shots = load_dataset_from_args(str(args.data), str(args.data), None, "text", "label", None, s["shots"],
                                         s["seed"])
    sampler = BatchSampler(len(data.examples), args.prompts, s["seed"])
    examples = [data.examples[i] for _ in range(args.steps) for i in sampler.next_batch()]
    prompts = make_prompts(tok, examples, data.labels, "grpo", shots, RolloutArgs().max_prompt_tokens)
    shot_pairs = [(x.text, x.label) for x in shots]
    messages = [build_messages(ex.text, data.labels, "grpo", shot_pairs) for ex in examples]
    return data.labels, examples, messages, {json.dumps(m): p.ids for m, p in zip(messages, prompts)}


class StageTimes(TrainerCallback):
    """Per-stage seconds of the current step, from method wrappers and Trainer callbacks; a record per step."""

    def __init__(self, path: Path):
        self.path, self.seconds, self.lengths = path, defaultdict(float), []
        self.step_start = self.optimizer_start = 0.0

    def timed(self, stage: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.seconds[stage] += time.perf_counter() - start

        return wrapper

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def mark_optimizer_start(self):
        sync()
        self.optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        sync()
        self.seconds["optimizer"] += time.perf_counter() - self.optimizer_start

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        now = time.perf_counter()
        s = self.seconds
        record = {
            "step": state.global_step,
            "time_generation": s["generate_and_score"] - s["ref_logprobs"] - s["old_logprobs"],
            "time_ref_logprobs": s["ref_logprobs"] + s["old_logprobs"],
            "time_old_logprobs": s["old_logprobs"],
            "time_generate_only": s["generate"],
            "time_policy_forward": s["policy_forward"],
            "time_backward": s["backward"],
            "time_optimizer": s["optimizer"],
            "time_step": now - self.step_start,
            "completion_length": sum(self.lengths) / max(len(self.lengths), 1),
            "peak_memory_gib": peak_memory_gib(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.seconds, self.lengths = defaultdict(float), []
        self.step_start = time.perf_counter()


def instrument(trainer: GRPOTrainer, times: StageTimes, expected_ids: dict) -> list[int]:
    """Wrap the trainer's methods to time the stages and check the prompt tokens; returns a live check count."""
    checked = [0]
    tokenize = trainer._tokenize_prompts

    def tokenize_checked(prompts):
        out = tokenize(prompts)
        for messages, ids in zip(prompts, out[0], strict=True):
            want = expected_ids[json.dumps(messages)]
            if list(ids) != want:
                raise AssertionError(f"TRL's prompt ids differ from gtacore's:\nTRL  {list(ids)}\nours {want}")
        checked[0] += len(prompts)
        return out

    generate = trainer._generate

    def generate_counted(prompts):
        out = generate(prompts)
        times.lengths += [len(ids) for ids in out[1]]  # completion ids, EOS included as in train.py
        return out

    logprobs = trainer._get_per_token_logps_and_entropies

    def logprobs_timed(model, *args, **kwargs):
        if torch.is_grad_enabled():  # the policy forward inside compute_loss, timed there
            return logprobs(model, *args, **kwargs)
        stage = "ref_logprobs" if model is trainer.ref_model else "old_logprobs"
        return times.timed(stage, logprobs)(model, *args, **kwargs)

    clip = trainer._clip_grad_norm

    def clip_timed(model):
        times.mark_optimizer_start()
        return clip(model)

    trainer._tokenize_prompts = tokenize_checked
    trainer._generate = times.timed("generate", generate_counted)
    trainer._generate_and_score_completions = times.timed("generate_and_score", trainer._generate_and_score_completions)
    trainer._get_per_token_logps_and_entropies = logprobs_timed
    trainer.compute_loss = times.timed("policy_forward", trainer.compute_loss)
    trainer.accelerator.backward = times.timed("backward", trainer.accelerator.backward)
    trainer._clip_grad_norm = clip_timed
    return checked


def main():
    args = parse_args()
    s = SETTINGS
    tok = Tokenizer(args.model)
    labels, examples, messages, expected_ids = gtacore_prompts(args, tok)

    def gtacore_reward(prompts, completions, completion_ids, label, **kwargs):
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in completion_ids]  # as sample_rollouts does
        rewards, _ = batch_rewards(texts, label, labels, "grpo", s["w_format"], s["w_acc"])
        return rewards.tolist()

    dataset = Dataset.from_list([{"prompt": m, "label": ex.label} for m, ex in zip(messages, examples)])
    config = GRPOConfig(
        output_dir=str(args.out), seed=s["seed"], max_steps=args.steps, shuffle_dataset=False,
        # One optimizer step = one generation batch of B prompts x G completions.
        per_device_train_batch_size=args.prompts * args.group_size, gradient_accumulation_steps=1,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=s["temperature"], top_p=s["top_p"], top_k=0, use_vllm=False,
        beta=args.beta, num_iterations=1, epsilon=s["eps"], loss_type="dapo",  # dapo = our token_mean over the step
        scale_rewards="group", mask_truncated_completions=False,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"], optim="adamw_torch_fused" if CUDA else "adamw_torch",
        model_init_kwargs={"dtype": "float32"}, use_cpu=not CUDA, bf16=CUDA, gradient_checkpointing=False,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    times = StageTimes(args.out / "metrics.jsonl")
    trainer = GRPOTrainer(model=str(args.model), reward_funcs=gtacore_reward, args=config, train_dataset=dataset,
                          callbacks=[times])
    checked = instrument(trainer, times, expected_ids)
    trainer.train()
    expected = args.steps * args.prompts * args.group_size
    if checked[0] != expected:
        raise AssertionError(f"checked {checked[0]} prompts, expected {expected}")
    (args.out / "summary.json").write_text(json.dumps({"prompts_checked": checked[0]}))
    print(f"prompt ids checked: {checked[0]} prompts identical to gtacore's", file=sys.stderr)


if __name__ == "__main__":
    main()
