"""Guess-Think-Answer training: `python train.py ...` on one device, `torchrun train.py ...` on many.

The loop, per step:
    rollout (KV cache, G samples per prompt) -> rewards -> group advantages
    -> reference log-probs (beta > 0) and old log-probs (mu > 1)
    -> for each of mu updates: SFT backward -> g_sft; RL backward -> g_rl
       -> gradient constraint -> clip -> AdamW step
    -> log metrics, evaluate, checkpoint

Modes: gta (guess by SFT, think/answer by RL), grpo (RL only), sft (label by
cross-entropy only). The method, step by step: docs/method.md; `--help` for the flags.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from gtacore import models
from gtacore.batches import BatchSampler
from gtacore.checkpointing import TrainingError, load_trainer_state, save_training
from gtacore.rewards import batch_rewards, group_advantages, label_balance, load_reward_fn, zero_variance_groups
from gtacore.config import Config, parse_config
from gtacore.run_data import load_run_data
from gtacore.distributed import DistInfo, init_distributed, shutdown, summed_over_ranks
from gtacore.errors import main_with_user_errors
from gtacore.evaluate import evaluate_with
from gtacore.losses import Branch, forward_backward, logprobs
from gtacore.memory import estimate_for_run, format_estimate
from gtacore.metrics import CollapseWatch, StepMetrics, Stopwatch, print_summary
from gtacore.packing import RL_ROW, SFT_ROW, global_row_counts_, pack_prompts, pack_rows
from gtacore.parallel import average_gradients, compute_precision, grad_norm_and_health, load_models, local, reshard
from gtacore.probe import Probe, make_probe, probe_examples, probe_shares
from gtacore.progress import Progress
from gtacore.reporting import Reporter
from gtacore.run_dir import (append_jsonl, check_model_dir, checkpoint_dir, clear_run_dir, latest_checkpoint,
                             open_run_dir, remove_partial_checkpoints, trim_logs)
from gtacore.projection import apply_gradient_constraint
from gtacore.prompts import make_prompts, print_dry_run, sft_targets
from gtacore.rollout import rollout
from gtacore.models.default_model import default_model_dir
from gtacore.models.tokenizer import Tokenizer


def lr_at(step: int, cfg: Config) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
        return o.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return o.lr


def step_generator(cfg: Config, step: int, info: DistInfo) -> torch.Generator:
    """Sampling randomness derived from (seed, step, rank): resuming needs no RNG state."""
    g = torch.Generator(device=info.device)
    g.manual_seed(cfg.run.seed * 1_000_003 + step * 1_009 + info.rank)
    return g


def train_step(cfg: Config, step: int, policy, rollout_model, ref_model, tok, prompts, labels, optimizer, info: DistInfo,
               probe: Probe | None = None) -> dict:
    """One batch of rollouts and `num_iterations` optimizer updates; returns the step's metrics.

    `rollout_model` generates (the policy itself, or its whole copy under FSDP). An update
    whose loss or gradient is not finite is not applied: the step ends there, skipped = 1.
    `probe`: the greedy probe, run on the policy entering the step every --probe-every steps.
    """
    L, R, G, dev = cfg.loss, cfg.rollout, cfg.rollout.group_size, info.device
    params = [p for group in optimizer.param_groups for p in group["params"]]  # FSDP: not a module's gathered copy
    autocast = compute_precision(cfg.model.precision, dev)  # bf16-mixed: bf16 compute, fp32 weights and grads
    clock, metrics = Stopwatch("probe", "rollout", "ref_old_logprobs", "forward_backward", "constraint", "optimizer"), \
        StepMetrics()
    if probe is not None and step % cfg.run.probe_every == 0:
        with clock("probe"), autocast:
            metrics.add(**probe_shares(policy if rollout_model is None else rollout_model, probe))
        if rollout_model is None and cfg.run.shard == "fsdp":
            reshard(policy)  # no backward frees the gathered root weights of that forward
    settings = L.settings(R.temperature, R.batch_size * G * R.max_new_tokens, info.world_size)
    if L.mode != "sft":  # RL: G sampled completions per prompt, rewarded, advantages within each group
        with clock("rollout"), autocast:
            ro = rollout(rollout_model, tok, prompts, L.mode, R, step_generator(cfg, step, info))
        golds = [prompts[r // G].example.label for r in range(len(ro.texts))]
        rewards, parsed = batch_rewards(ro.texts, golds, labels, L.mode, L.w_format, L.w_acc,
                                        load_reward_fn(L.reward_fn) if L.reward_fn else None, step=step + 1)
        advantages = group_advantages(rewards, G, scale_std=L.scale_std)
        if L.balance_labels:  # each gold label's rollouts pull with equal total weight (docs/method.md)
            units = [float(any(m)) if L.agg == "seq_mean" else float(sum(m)) for m in ro.rl_masks]
            advantages = advantages * label_balance(golds, units, labels, summed_over_ranks(info))
        metrics.add(zero_variance_groups=zero_variance_groups(rewards, G))  # groups with no RL signal
        metrics.rollout(rewards, parsed, golds, labels, ro.num_tokens, clock.seconds["rollout"], L.mode)
    # The loss rows: each prompt once (shared prefix), then its SFT target and its G completions.
    prompt_rows = pack_prompts([p.ids for p in prompts], dev) if L.shared_prefix else [p.ids for p in prompts]
    branches = []
    if L.mode in ("gta", "sft"):  # SFT: prompt + gold target, teacher-forced at temperature 1, no KL
        targets, masks = sft_targets(tok, prompts, L.mode)
        sft_rows = pack_rows(prompt_rows, range(len(prompts)), targets, masks, SFT_ROW, None, dev)
        branches.append(Branch(sft_rows, replace(settings, temperature=1.0, beta=0.0)))
    if L.mode != "sft":
        rl = Branch(pack_rows(prompt_rows, [r // G for r in range(len(golds))], ro.completions, ro.rl_masks, RL_ROW,
                              advantages.tolist(), dev), settings)
        branches.append(rl)
    global_row_counts_([b.rows for b in branches], info)  # the loss means are over the global batch
    with clock("ref_old_logprobs"), autocast:
        if L.mode != "sft" and L.beta > 0:
            rl.ref_logprobs = logprobs(ref_model, rl.rows, R.temperature)
            if cfg.run.shard == "fsdp":
                reshard(ref_model)  # no backward will free its gathered root weights
        if L.mode != "sft" and L.num_iterations > 1:
            rl.old_logprobs = logprobs(policy, rl.rows, R.temperature)

    metrics.add(skipped=0.0, truncated_prompts=sum(p.truncated for p in prompts) * info.world_size)  # a rank mean
    for _ in range(L.num_iterations):
        optimizer.zero_grad(set_to_none=True)  # after a step p.grad holds the combined gradient
        with clock("forward_backward"), autocast:
            results = forward_backward(policy, params, branches)
        for r in results:
            average_gradients(r.grads, info)  # DDP; FSDP's backward already reduce-scattered them
        metrics.losses(results[0].loss if L.mode != "grpo" else None, results[-1].loss if L.mode != "sft" else None)
        with clock("constraint"):
            if len(results) == 2:
                metrics.constraint(apply_gradient_constraint(params, results[0].grads, results[1].grads, L.constraint,
                                                             L.granularity))
            else:
                for p, g in zip(params, results[0].grads):
                    p.grad = g
        with clock("optimizer"):
            grads = [local(p.grad) for p in params if p.grad is not None]
            norm, healthy = grad_norm_and_health(grads, [r.loss.loss for r in results], info, cfg.run.shard == "fsdp")
            metrics.add(grad_norm=norm)
            if not healthy:  # never apply it: skip the rest of this step
                optimizer.zero_grad(set_to_none=True)
                metrics.add(skipped=1.0)
                break
            if cfg.optim.max_grad_norm > 0:
                torch._foreach_mul_(grads, (cfg.optim.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            optimizer.step()
    return metrics.reduce(info) | {f"time_{k}": v for k, v in clock.seconds.items()} | {"lr": lr_at(step, cfg)}


def main(argv=None) -> None:
    cfg = parse_config(argv, description=__doc__)  # GPU machines get larger defaults
    info = init_distributed(cfg.run.device, cfg.run.dist_timeout, need_group=cfg.run.shard == "fsdp")
    try:
        run(cfg, info)
        if info.distributed:  # gloo: a rank leaving while its last send is in flight aborts the other
            torch.distributed.barrier()
    finally:
        shutdown(info)


def run(cfg: Config, info: DistInfo) -> None:
    torch.manual_seed(cfg.run.seed)
    out_dir, D, say = Path(cfg.run.output_dir), cfg.data, (print if info.is_main else lambda *a, **k: None)

    # --- run folder, model folder, tokenizer, data (no weights yet: --dry-run stops before them) ---
    model_path = Path(cfg.model.model) if cfg.model.model else default_model_dir(verbose=info.is_main)
    check_model_dir(model_path)
    tok = Tokenizer(model_path)
    tok.check_fits(models.ModelConfig.from_file(model_path).vocab_size, model_path)
    data = load_run_data(cfg, say)  # without --data: the bundled files, named in cfg as a saved run has them
    resume_from = None if cfg.run.dry_run else open_run_dir(out_dir, cfg.to_dict(), info, say)
    sampler = BatchSampler(len(data.train.examples), cfg.rollout.batch_size, cfg.run.seed, info.rank, info.world_size,
                           source=D.data)

    def prompts_for(examples):
        return make_prompts(tok, examples, data.labels, cfg.loss.mode, data.shots, cfg.rollout.max_prompt_tokens,
                            cfg.rollout.long_prompts == "truncate", system_prompt=D.system_prompt,
                            template_system_prompt=D.template_system_prompt)

    if cfg.run.dry_run:
        if info.is_main:
            print_dry_run(tok, data.labels, cfg.loss.mode, prompts_for([data.train.examples[sampler.next_batch()[0]]])[0])
        return

    # --- load, optimizer ---
    policy, ref_model, rollout_model = load_models(cfg, model_path, resume_from, info)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  fused=info.device.type == "cuda")
    start_step, bad_steps = 0, 0  # bad_steps: consecutive skipped (non-finite) steps
    if resume_from is not None:
        state = load_trainer_state(resume_from, optimizer)
        sampler.load_state_dict(state["sampler"])
        start_step, bad_steps = state["step"], state.get("bad_steps", 0)
        say(f"resumed from {resume_from} at step {start_step}")

    def run_eval(tag: str, step: int) -> dict | None:
        if not data.eval_examples:
            return None
        report = evaluate_with(cfg, rollout_model(), tok, data.eval_examples, data.labels, data.shots, info,
                               progress=cfg.run.progress and info.is_main)
        if info.is_main:
            append_jsonl(out_dir / "eval.jsonl", {"step": step, "tag": tag, **{k: v for k, v in report.items()
                                                                                if k != "samples"}})
            reporter.log(report, step, "eval")
        return report

    def save(path: Path, step: int) -> None:
        state = {"step": step, "sampler": sampler.state_dict(), "bad_steps": bad_steps, "config": cfg.to_dict(),
                 "world_size": info.world_size}
        save_training(path, policy, model_path, optimizer, state, info, dtype=cfg.run.save_dtype,
                      keep_last=cfg.run.save_total_limit, protect=[resume_from])

    estimate = estimate_for_run(cfg, policy.config, tok, data.train.examples, data.labels, data.shots, info.world_size,
                                cfg.rollout.long_prompts == "truncate")
    if info.is_main:
        say(format_estimate(estimate, f"memory estimate per rank ({cfg.run.shard}, {info.world_size} rank(s)):"))
        start_run_dir(out_dir, cfg.to_dict(), estimate, start_step, say)
    reporter = Reporter(cfg.run.report_to if info.is_main else "none", out_dir, cfg.to_dict(), cfg.run.wandb_project,
                        cfg.run.run_name)
    before = run_eval("before", start_step) if start_step == 0 else None
    probe = make_probe(tok, prompts_for(probe_examples(data.train.examples, cfg.run.probe_prompts, cfg.run.seed)),
                       data.labels, cfg.loss.mode, cfg.loss.shared_prefix, info.device) if cfg.run.probe_every else None

    # --- loop ---
    bar = Progress(cfg.optim.max_steps - start_step, "train", enabled=cfg.run.progress and info.is_main)
    collapse = CollapseWatch(cfg.run.collapse_share, cfg.run.collapse_steps)
    for step in range(start_step, cfg.optim.max_steps):
        t0 = time.perf_counter()
        prompts = prompts_for([data.train.examples[i] for i in sampler.next_batch()])
        gen_model = rollout_model() if cfg.loss.mode != "sft" else None
        metrics = train_step(cfg, step, policy, gen_model, ref_model, tok, prompts, data.labels, optimizer, info, probe)
        bad_steps = bad_steps + 1 if metrics["skipped"] else 0
        metrics.update(step=step + 1, time_step=time.perf_counter() - t0, bad_steps_in_a_row=bad_steps)
        if info.is_main:
            append_jsonl(out_dir / "metrics.jsonl", metrics)
            reporter.log(metrics, step + 1, "train")
        warning = collapse.update(metrics)
        bar.update(1, **{k: metrics[k] for k in ("reward_mean", "sft_loss", "rl_loss") if metrics.get(k) is not None},
                   **({"collapse": collapse.label} if warning else {}))
        if warning:
            say(f"\nstep {step + 1}: {warning}")
        if metrics["skipped"]:
            check_bad_steps(bad_steps, step, cfg, out_dir, say)
        done = step + 1
        if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < cfg.optim.max_steps:
            run_eval("periodic", done)
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < cfg.optim.max_steps:
            save(checkpoint_dir(out_dir, done), done)
    bar.close()

    # --- final: the last checkpoint, final/ as hard links to its weights, the evaluation after ---
    last = checkpoint_dir(out_dir, cfg.optim.max_steps)
    save(last, cfg.optim.max_steps)
    if info.is_main and not models.checkpoint.link_pretrained(last, out_dir / "final"):
        say(f"final/: the filesystem refused hard links, so {last.name}'s weights were copied")
    after = run_eval("after", cfg.optim.max_steps)
    reporter.close()
    if info.is_main:
        print_summary(before, after, out_dir, f"{cfg.loss.mode} on {Path(D.data).name}", estimate["peak"], info.device)


def start_run_dir(out_dir: Path, config: dict, estimate: dict, start_step: int, say) -> None:
    """Rank 0, once the model and data are loaded: clear what this run replaces, then write its
    configuration and memory estimate."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for partial in remove_partial_checkpoints(out_dir):
        say(f"removed {partial.name}: a checkpoint write that never finished")
    if start_step == 0:  # a fresh run (--overwrite, or --resume with nothing to resume): nothing of the old stays
        for old in clear_run_dir(out_dir):
            say(f"removed {old.name} of the earlier run in {out_dir}")
    trim_logs(out_dir, start_step)
    (out_dir / "memory_estimate.json").write_text(json.dumps({k: v / 1e9 for k, v in estimate.items()}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def check_bad_steps(bad_steps: int, step: int, cfg: Config, out_dir: Path, say) -> None:
    say(f"\nstep {step + 1}: non-finite loss or gradient; update skipped ({bad_steps} in a row)")
    if bad_steps >= cfg.optim.max_bad_steps:
        raise TrainingError(
            f"{bad_steps} steps in a row had a non-finite loss or gradient (the last at step {step + 1}); stopping. "
            f"Nothing was written from them; the last checkpoint is {latest_checkpoint(out_dir) or 'none'}. "
            "Lower --lr, check the data and the model, or raise --max-bad-steps.")


if __name__ == "__main__":
    main_with_user_errors(main)
