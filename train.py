"""Guess-Think-Answer training: `python train.py ...` on one device, `torchrun train.py ...` on many.

The loop, per step:
    rollout (KV cache, G samples per prompt) -> rewards -> group advantages
    -> reference log-probs (beta > 0) and old log-probs (mu > 1)
    -> for each of mu updates: SFT backward -> g_sft; RL backward -> g_rl
       -> gradient constraint -> clip -> AdamW step
    -> log metrics, evaluate, checkpoint

Modes: gta (guess by SFT, think/answer by RL), grpo (RL only), sft (label by
cross-entropy only). See ../shared/GTA.md for the method; `--help` for the flags.
"""

from __future__ import annotations

import json
import math
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import models
from gtacore.checkpointing import (checkpoint_dir, latest_checkpoint, load_trainer_state, remove_partial_checkpoints,
                                   save_checkpoint)
from gtacore.config import Config, parse_config
from gtacore.sampling import BatchSampler
from gtacore.distributed import (DistInfo, all_finite, all_reduce_grads_, all_reduce_mean, assert_replicas_identical,
                                 global_row_counts_, grad_norm_and_health, init_distributed, shutdown)
from gtacore.evaluate import eval_subset, evaluate
from gtacore.fsdp import WholeModel, constrain_sharded_gradients, full_state_dict, local, reshard, shard_model
from gtacore.loading import load_dataset_from_args
from gtacore.memory import estimate_for_run, format_estimate
from gtacore.metrics import format_table
from gtacore.batch import RL_ROW, SFT_ROW, pack
from gtacore.policy import checkpoint_blocks, packed_logprobs, plain_backward
from gtacore.prefix import pack_branches, pack_prompts, prefix_backward, prefix_logprobs
from gtacore.progress import Progress
from gtacore.projection import apply_gradient_constraint
from gtacore.rollout import make_prompts, sample_rollouts, sft_targets
from models.default_model import default_model_dir
from models.generate import SamplingParams
from models.tokenizer import Tokenizer


def lr_at(step: int, cfg: Config) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
        return o.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return o.lr


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def step_generator(cfg: Config, step: int, info: DistInfo) -> torch.Generator:
    """Sampling randomness derived from (seed, step, rank): resuming needs no RNG state."""
    g = torch.Generator(device=info.device)
    g.manual_seed(cfg.run.seed * 1_000_003 + step * 1_009 + info.rank)
    return g


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


def train_step(cfg: Config, step: int, policy, rollout_model, ref_model, tok, prompts, labels, optimizer, info: DistInfo) -> dict:
    """One batch of rollouts and `num_iterations` optimizer updates; returns the step's metrics.

    `rollout_model` generates (the policy itself, or its whole copy under FSDP).
    An update whose loss or gradient is not finite is not applied: the step ends
    there and reports skipped = 1.
    """
    L, R = cfg.loss, cfg.rollout
    sharded = cfg.run.shard == "fsdp"
    # The optimizer's own tensors: under FSDP a module attribute may point at a gathered copy.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if info.device.type == "cuda" else nullcontext()
    times, m = {}, {}

    t0 = time.perf_counter()
    ro = None
    if L.mode != "sft":
        sampling = SamplingParams(max_new_tokens=R.max_new_tokens, temperature=R.temperature, top_p=R.top_p, num_samples=R.group_size)
        rollout_model.eval()
        with autocast:
            ro = sample_rollouts(rollout_model, tok, prompts, labels, L.mode, sampling, step_generator(cfg, step, info),
                                 L.w_format, L.w_acc, L.scale_std)
        policy.train()
    times["rollout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    G, dev = R.group_size, info.device
    if cfg.loss.shared_prefix:  # one prompt pass per prompt for all its continuations
        pp = pack_prompts([p.ids for p in prompts], dev)
        make = lambda parent, conts, masks, kind, adv: pack_branches(pp, parent, conts, masks, kind, adv, dev)  # noqa: E731
        logprobs = lambda model, b: prefix_logprobs(model, pp, b, R.temperature)  # noqa: E731
        backward = lambda branches: prefix_backward(policy, params, pp, branches, L)  # noqa: E731
    else:  # every sequence in full (for comparison)
        make = lambda parent, conts, masks, kind, adv: pack([prompts[b].ids for b in parent], conts, masks, kind, adv, dev)  # noqa: E731
        logprobs = lambda model, b: packed_logprobs(model, b, R.temperature)  # noqa: E731
        backward = lambda batches: plain_backward(policy, params, batches, L)  # noqa: E731
    rl = sft = None
    if ro is not None:
        rl = make([r // G for r in range(len(ro.completions))], ro.completions, ro.rl_masks, RL_ROW, ro.advantages.tolist())
    if L.mode in ("gta", "sft"):
        sft = make(list(range(len(prompts))), *sft_targets(tok, prompts, L.mode), SFT_ROW, None)
    global_row_counts_([b for b in (sft, rl) if b is not None], info)  # means over the global batch
    ref_lp = old_lp = None
    with autocast:
        if rl is not None and L.beta > 0:
            ref_lp = logprobs(ref_model, rl)
            if sharded:
                reshard(ref_model)  # no backward will free its gathered root weights
        if rl is not None and L.num_iterations > 1:
            old_lp = logprobs(policy, rl)
    times["ref_old_logprobs"] = time.perf_counter() - t0

    normalizer = L.loss_normalizer or R.batch_size * R.group_size * R.max_new_tokens
    times["forward_backward"] = times["constraint"] = times["optimizer"] = 0.0
    m["skipped"] = 0.0
    m["truncated_prompts"] = sum(p.truncated for p in prompts) * info.world_size  # the mean over ranks is the total
    for _ in range(L.num_iterations):
        t0 = time.perf_counter()
        # Each update starts from no gradient: after a step p.grad holds the combined
        # gradient, and the next backward would add into it (mu > 1).
        optimizer.zero_grad(set_to_none=True)
        branches = ([(sft, None, None, normalizer, 1.0)] if sft is not None else []) + (
            [(rl, old_lp, ref_lp, normalizer, R.temperature)] if rl is not None else [])
        with autocast:
            results = backward(branches)
        sft_grads = rl_grads = None
        if sft is not None:
            sft_grads, out = results[0]
            m["sft_loss"] = out.sft_loss
        if rl is not None:
            rl_grads, out = results[-1]
            s = out.stats
            # Token averages as (sum, count): a rank whose rollouts left no RL token adds nothing.
            n = torch.tensor(float(s["kl"].numel()))
            m.update(rl_loss=out.rl_loss, kl=(s["kl"].sum(), n), clip_fraction=(s["clipped"].float().sum(), n),
                     entropy=(s["entropy"].sum(), n))
        if not sharded:  # FSDP's backward already reduce-scattered them
            for grads in (sft_grads, rl_grads):
                if grads is not None:
                    all_reduce_grads_(grads, info)
        times["forward_backward"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        if sft_grads is not None and rl_grads is not None:
            constrain = constrain_sharded_gradients if sharded else apply_gradient_constraint
            cs = constrain(params, sft_grads, rl_grads, L.constraint, L.granularity)
            m.update(grad_cosine=cs.cosine, conflict_fraction=cs.conflict_fraction_params,
                     conflict_fraction_elements=cs.conflict_fraction_elements)
        else:
            for p, g in zip(params, sft_grads or rl_grads):
                p.grad = g
        times["constraint"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        grads = [local(p.grad) for p in params if p.grad is not None]
        norm, healthy = grad_norm_and_health(grads, [out.loss for _, out in results], info, sharded)
        m["grad_norm"] = norm
        if not healthy:  # never apply it: skip the rest of this step
            for p in params:
                p.grad = None
            m["skipped"] = 1.0
            break
        if cfg.optim.max_grad_norm > 0:
            torch._foreach_mul_(grads, (cfg.optim.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.step()
        times["optimizer"] += time.perf_counter() - t0

    if ro is not None:
        golds = [prompts[r // R.group_size].example.label for r in range(len(ro.parsed))]
        m.update(
            reward_mean=ro.rewards.mean(),
            reward_std=ro.rewards.std() if len(ro.rewards) > 1 else torch.tensor(0.0),
            format_rate=sum(p.format_ok for p in ro.parsed) / len(ro.parsed),
            train_accuracy=sum(p.answer == y for p, y in zip(ro.parsed, golds)) / len(golds),
            completion_length=ro.num_tokens / len(ro.parsed),
            rollout_tokens_per_s=ro.num_tokens / max(times["rollout"], 1e-9),
        )
        if L.mode == "gta":
            m["guess_accuracy"] = sum(p.guess == y for p, y in zip(ro.parsed, golds)) / len(golds)
    # Metrics leave the device once per step, here (the other sync is the health check
    # of each update); rank means of (sum, count) pairs give token averages over all ranks.
    # Losses are rank means.
    names = sorted(m)
    pairs = [m[k] if isinstance(m[k], tuple) else (m[k], 1.0) for k in names]
    flat = [torch.as_tensor(x, dtype=torch.float64, device=info.device).reshape(()) for pair in pairs for x in pair]
    values = all_reduce_mean(torch.stack(flat), info)
    sums, counts = values.view(-1, 2).unbind(1)  # [len(names)] each
    sums, counts = sums.tolist(), counts.tolist()
    out = {k: v / c if c > 0 and math.isfinite(v / c) else None  # JSON has no NaN
           for k, v, c in zip(names, sums, counts)}
    out.update({f"time_{k}": v for k, v in times.items()}, lr=lr_at(step, cfg), peak_memory_gb=peak_memory_gb(info.device))
    return out


def print_dry_run(cfg: Config, tok: Tokenizer, labels: list[str], prompt) -> None:
    """What the model sees: the first training prompt exactly as its token ids decode (special
    tokens included), the SFT target and which of its tokens carry the loss, the label set."""
    print(f"labels ({len(labels)}): {', '.join(labels)}")
    print(f"mode: {cfg.loss.mode}; worked examples: {cfg.data.shots}; first training example: {prompt.example.source}"
          + (" (text truncated to fit --max-prompt-tokens)" if prompt.truncated else ""))
    print(f"--- prompt: {len(prompt.ids)} tokens, as the model receives them ---")
    print(tok.decode(prompt.ids))
    print("--- end of prompt; the model's first generated token follows ---")
    if cfg.loss.mode in ("gta", "sft"):
        (ids,), (mask,) = sft_targets(tok, [prompt], cfg.loss.mode)
        print(f"SFT target ({len(ids)} tokens): {tok.decode(ids)!r}")
        print("SFT loss on: " + " ".join(repr(tok.decode([t])) for t, m in zip(ids, mask) if m))


BUNDLED_TRAIN = Path(__file__).resolve().parent / "data" / "emotion_train.jsonl"
BUNDLED_TEST = BUNDLED_TRAIN.with_name("emotion_test.jsonl")


def main(argv=None) -> None:
    device = parse_config(argv, description=__doc__).run.device
    gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    cfg = parse_config(argv, description=__doc__, gpu=gpu)  # GPU machines get larger defaults
    info = init_distributed(cfg.run.device, cfg.run.dist_timeout, need_group=cfg.run.shard == "fsdp")
    try:
        run(cfg, info)
        if info.distributed:  # gloo: a rank leaving while its last send is in flight aborts the other
            torch.distributed.barrier()
    finally:
        shutdown(info)


def run(cfg: Config, info: DistInfo) -> None:
    torch.manual_seed(cfg.run.seed)
    out_dir = Path(cfg.run.output_dir)
    say = print if info.is_main else (lambda *a, **k: None)

    # --- model folder, tokenizer, data (no weights yet: --dry-run stops before them) ---
    model_path = Path(cfg.model.model) if cfg.model.model else default_model_dir(verbose=info.is_main)
    resume_from = latest_checkpoint(out_dir) if cfg.run.resume else None
    if cfg.run.resume and resume_from is None:
        say(f"--resume: no complete checkpoint in {out_dir}; starting fresh")
    tok = Tokenizer(model_path)
    tok.check_fits(models.ModelConfig.from_file(model_path).vocab_size, model_path)
    D = cfg.data
    if D.data is None:  # the built-in default: the bundled emotion dataset
        D.data, D.eval_data = str(BUNDLED_TRAIN), str(BUNDLED_TEST)
        say(f"data: {D.data} (bundled; pass --data FILE for your own)")
    train_data, shots = load_dataset_from_args(D.data, D.data, D.recipe, D.text_field, D.label_field, D.labels, D.shots,
                                               cfg.run.seed, D.skip_unknown_labels)
    labels = train_data.labels
    eval_examples = []
    if D.eval_data:
        eval_data, _ = load_dataset_from_args(D.eval_data, None, D.recipe, D.text_field, D.label_field, D.labels, 0,
                                              cfg.run.seed, D.skip_unknown_labels, label_set=labels)
        eval_examples = eval_subset(eval_data.examples, D.max_eval_examples, cfg.run.seed)
    sampler = BatchSampler(len(train_data.examples), cfg.rollout.batch_size, cfg.run.seed, info.rank, info.world_size,
                           source=D.data)
    truncate = cfg.rollout.long_prompts == "truncate"
    prompt_style = dict(system_prompt=D.system_prompt, template_system_prompt=D.template_system_prompt)

    def prompts_for(examples):
        return make_prompts(tok, examples, labels, cfg.loss.mode, shots, cfg.rollout.max_prompt_tokens, truncate,
                            **prompt_style)

    if cfg.run.dry_run:
        if info.is_main:
            print_dry_run(cfg, tok, labels, prompts_for([train_data.examples[sampler.next_batch()[0]]])[0])
        return

    # --- load ---
    dtype = models.parse_dtype(cfg.model.dtype)
    sharded = cfg.run.shard == "fsdp"  # see gtacore/fsdp.py for what each stage does with the shards
    gpu_bf16 = info.device.type == "cuda"
    # Each model is read whole, then sharded before the next one is read.
    policy = models.load_pretrained(resume_from or model_path, dtype=dtype, device=info.device).train()
    if cfg.run.activation_checkpointing:
        checkpoint_blocks(policy)
    if sharded:
        shard_model(policy, mixed_precision=gpu_bf16)
    ref_model = None
    if cfg.loss.beta > 0 and cfg.loss.mode != "sft":
        ref_model = models.load_pretrained(model_path, dtype=dtype, device=info.device).eval().requires_grad_(False)
        if sharded:
            shard_model(ref_model, mixed_precision=gpu_bf16)
    rollout_copy = WholeModel(policy, torch.bfloat16 if gpu_bf16 else dtype, info.device) if sharded else None

    # --- optimizer ---
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  fused=info.device.type == "cuda")
    start_step, bad_steps = 0, 0  # bad_steps: consecutive skipped (non-finite) steps
    if resume_from is not None:
        state = load_trainer_state(resume_from, optimizer)
        sampler.load_state_dict(state["sampler"])
        start_step, bad_steps = state["step"], state.get("bad_steps", 0)
        say(f"resumed from {resume_from} at step {start_step}")

    def rollout_model():
        """The model that generates: the policy, or (FSDP) its whole copy, refreshed."""
        return rollout_copy.refresh(policy) if sharded else policy

    def run_eval(tag: str, step: int) -> dict | None:
        if not eval_examples:
            return None
        report = evaluate(rollout_model(), tok, eval_examples, labels, cfg.loss.mode, shots, cfg.rollout.max_new_tokens,
                          cfg.rollout.max_prompt_tokens, cfg.run.eval_batch_size, progress=cfg.run.progress and info.is_main,
                          truncate=truncate, info=info, **prompt_style)
        if info.is_main:
            with open(out_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "tag": tag, **{k: v for k, v in report.items() if k != "samples"}}) + "\n")
        return report

    def save(path: Path, step: int) -> None:
        if not all_finite([local(p) for p in params], info):
            raise TrainingError(f"the parameters are not finite at step {step}; not writing {path}")
        state = {"step": step, "sampler": sampler.state_dict(), "bad_steps": bad_steps, "config": cfg.to_dict()}
        if sharded:  # every rank takes part: weights are gathered, each writes its optimizer shard
            save_checkpoint(path, policy, model_path, optimizer, state, info)
            return
        assert_replicas_identical(params, info)
        if info.is_main:
            save_checkpoint(path, policy, model_path, optimizer, state, info)

    estimate = estimate_for_run(cfg, policy.config, tok, train_data.examples, labels, shots, info.world_size,
                                info.device.type, truncate)
    if info.is_main:
        say(format_estimate(estimate, f"memory estimate per rank ({cfg.run.shard}, {info.world_size} rank(s)):"))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "memory_estimate.json").write_text(json.dumps({k: v / 1e9 for k, v in estimate.items()}, indent=2))
        for partial in remove_partial_checkpoints(out_dir):
            say(f"removed {partial.name}: a checkpoint write that never finished")
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    before = run_eval("before", start_step) if start_step == 0 else None

    # --- loop ---
    bar = Progress(cfg.optim.max_steps - start_step, "train", enabled=cfg.run.progress and info.is_main)
    for step in range(start_step, cfg.optim.max_steps):
        t0 = time.perf_counter()
        examples = [train_data.examples[i] for i in sampler.next_batch()]
        prompts = prompts_for(examples)
        gen_model = rollout_model() if cfg.loss.mode != "sft" else None
        metrics = train_step(cfg, step, policy, gen_model, ref_model, tok, prompts, labels, optimizer, info)
        metrics.update(step=step + 1, time_step=time.perf_counter() - t0)
        bad_steps = bad_steps + 1 if metrics["skipped"] else 0
        metrics["bad_steps_in_a_row"] = bad_steps
        if info.is_main:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        bar.update(1, **{k: metrics[k] for k in ("reward_mean", "sft_loss", "rl_loss") if metrics.get(k) is not None})
        if metrics["skipped"]:
            say(f"\nstep {step + 1}: non-finite loss or gradient; update skipped ({bad_steps} in a row)")
            if bad_steps >= cfg.optim.max_bad_steps:
                last = latest_checkpoint(out_dir)
                raise TrainingError(
                    f"{bad_steps} steps in a row had a non-finite loss or gradient (the last at step {step + 1}); stopping. "
                    f"Nothing was written from them; the last checkpoint is {last or 'none'}. Lower --lr, check the "
                    "data and the model, or raise --max-bad-steps.")
        done = step + 1
        if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < cfg.optim.max_steps:
            run_eval("periodic", done)
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < cfg.optim.max_steps:
            save(checkpoint_dir(out_dir, done), done)
    bar.close()

    # --- final ---
    save(checkpoint_dir(out_dir, cfg.optim.max_steps), cfg.optim.max_steps)
    weights = full_state_dict(policy, info.is_main) if sharded else None
    if info.is_main:
        models.save_pretrained(policy, out_dir / "final", tokenizer_dir=model_path, state_dict=weights)
    after = run_eval("after", cfg.optim.max_steps)
    if info.is_main and after is not None:
        say("\n" + format_table(after))
        if before is not None:
            keys = ("accuracy", "weighted_f1", "format_rate", "guess_accuracy")
            say(f"\n{'metric':<16}{'before':>10}{'after':>10}")
            for k in keys:
                if k in after:
                    say(f"{k:<16}{before.get(k, float('nan')):>10.3f}{after[k]:>10.3f}")
    if info.is_main:
        try:
            from gtacore.plot import plot_runs

            say(f"curves: {plot_runs([out_dir], out_dir / 'curves.png', title=f'{cfg.loss.mode} on {Path(D.data).name}')}")
        except SystemExit as e:  # matplotlib is optional
            say(f"no plot: {e}")
    measured = peak_memory_gb(info.device)
    say(f"peak memory: {measured:.3f} GB measured ({'allocated by torch' if info.device.type == 'cuda' else 'process RSS'}), "
        f"{estimate['peak'] / 1e9:.3f} GB estimated")
    say(f"outputs in {out_dir}")


if __name__ == "__main__":
    main()
