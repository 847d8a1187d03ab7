"""One RL step of TRL's GRPOTrainer against ours (grpo and gta modes), stage by stage, on one machine.

The configuration is the same for all three systems: the built-in SmolLM2-135M-Instruct in float32, the
bundled emotion data with one worked example in the prompt, 4 prompts x G = 8 samples per step, at most
64 new tokens, temperature 1 and top_p 1, beta 0.01 against a frozen reference model, a token-mean
clipped loss (eps 0.2), AdamW at lr 1e-6 (fused on CUDA, plain on CPU) after clipping the gradient norm
to 1, a constant learning rate, no gradient checkpointing, seed 0. TRL sees the same prompts in the same
order as ours, with the same prompt tokens (checked token by token at every step), and its completions
are scored by our `batch_rewards` in grpo mode. On CUDA every system runs bf16 autocast over fp32
weights (ours always does; TRL with bf16=True); on CPU everything is fp32.

Each system runs in its own process, so that its imports and peak memory are its own:
    trl        bench/trl_runner.py (its docstring maps each stage to the TRL code it times)
    grpo, gta  train.py --mode grpo|gta; stage times from its metrics.jsonl

Stages, in seconds per optimizer step, each the median over the steps after --warmup-steps:
    generation  sample G completions per prompt, decode, reward, group advantages
    ref         the reference model's log-probs of the completions (no grad)
    fwd, bwd    the policy forward with the loss, and the backward (TRL only: ours times them as one stage)
    fwd+bwd     policy forward, loss and backward (ours: SFT and RL backwards in gta mode)
    constraint  ours only: combining the SFT and RL gradients (projection in gta; a hand-over in grpo)
    optimizer   gradient-norm clipping and the AdamW step
    other       the rest of the step (data, prompt building, zero_grad, logging), total minus the stages
    total       the whole step
Peak memory is what train.py logs as `peak_memory_gb`, measured the same way in the TRL process at the
end of its last step: on CPU the process's peak resident set (ru_maxrss), on CUDA
torch.cuda.max_memory_allocated. Completions are sampled from different random streams, so their
lengths differ between systems: the `tokens` column (mean completion length) is part of the comparison.

Outputs in --out (default runs/bench_vs_trl/): results.csv (one row per system and per ratio, with the
machine, versions, commit and command), results.md (tables to paste into bench/README.md), and per
system its log and per-step metrics.jsonl.

TRL is installed for this benchmark only; it is not a dependency of gtacore: pip install trl==1.16.0
"""

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/bench_vs_trl.py` from a checkout, installed or not

from bench.common import git_commit  # noqa: E402  (children run without its TRITON_INTERPRET)
from gtacore.models.default_model import default_model_dir  # noqa: E402

TRL_VERSION = "1.16.0"  # trl_runner.py wraps this version's GRPOTrainer methods
SYSTEMS = ("trl", "grpo", "gta")
# Settings the command line does not change; trl_runner.py reads them from here too.
SETTINGS = dict(temperature=1.0, top_p=1.0, shots=1, seed=0, eps=0.2, max_grad_norm=1.0, weight_decay=0.0,
                w_format=1.0, w_acc=1.0)
STAGES = ("generation", "ref", "fwd", "bwd", "fwd+bwd", "constraint", "optimizer", "other", "total")
NAMES = {"trl": "trl", "grpo": "ours-grpo", "gta": "ours-gta"}
RATIOS = (("trl", "grpo"), ("trl", "gta"), ("gta", "grpo"))
RATIO_COLUMNS = ("generation", "ref", "fwd+bwd", "optimizer", "total", "peak_gib")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--systems", default=",".join(SYSTEMS), help="comma-separated subset of trl,grpo,gta (default %(default)s)")
    add("--steps", type=int, default=3, help="optimizer steps per system, warm-up included (default %(default)s)")
    add("--warmup-steps", type=int, default=1, help="first steps left out of the medians (default %(default)s)")
    add("--prompts", type=int, default=4, help="prompts per step (default %(default)s)")
    add("--group-size", type=int, default=8, help="G: completions per prompt (default %(default)s)")
    add("--max-new-tokens", type=int, default=64, help="completion length limit (default %(default)s)")
    add("--beta", type=float, default=0.01, help="KL weight to the frozen reference model (default %(default)s)")
    add("--lr", type=float, default=1e-6, help="AdamW learning rate (default %(default)s)")
    add("--model", type=Path, default=None, help="checkpoint folder (default: the built-in model)")
    add("--data", type=Path, default=REPO / "gtacore" / "bundled" / "emotion_train.jsonl", help="training file (default %(default)s)")
    add("--out", type=Path, default=REPO / "runs" / "bench_vs_trl", help="output folder (default %(default)s)")
    args = parser.parse_args()
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown or not args.systems:
        parser.error(f"--systems: unknown {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"need 0 <= --warmup-steps < --steps, got {args.warmup_steps} and {args.steps}")
    return args


def check_trl() -> None:
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"TRL is not installed; only this benchmark needs it:\n    pip install trl=={TRL_VERSION}\n"
                         "or leave it out with --systems grpo,gta")
    if version != TRL_VERSION:
        print(f"warning: trl {version} is installed; trl_runner.py wraps the methods of trl {TRL_VERSION}",
              file=sys.stderr)


def ours_command(args, mode: str, out: Path) -> list[str]:
    s = SETTINGS
    flags = {"model": args.model, "precision": "bf16-mixed" if torch.cuda.is_available() else "fp32", "data": args.data, "mode": mode, "shots": s["shots"],
             "batch-size": args.prompts, "group-size": args.group_size, "max-new-tokens": args.max_new_tokens,
             "temperature": s["temperature"], "top-p": s["top_p"], "beta": args.beta, "eps-low": s["eps"],
             "eps-high": s["eps"], "num-iterations": 1, "agg": "token_mean", "w-format": s["w_format"],
             "w-acc": s["w_acc"], "lr": args.lr, "weight-decay": s["weight_decay"], "schedule": "constant",
             "warmup-steps": 0, "max-grad-norm": s["max_grad_norm"], "max-steps": args.steps, "seed": s["seed"],
             "output-dir": out}
    return [sys.executable, str(REPO / "train.py"), *as_flags(flags), "--no-progress", "--overwrite",
            "--probe-every", "0"]  # TRL has no greedy probe


def trl_command(args, out: Path) -> list[str]:
    flags = {"model": args.model, "data": args.data, "steps": args.steps, "prompts": args.prompts,
             "group-size": args.group_size, "max-new-tokens": args.max_new_tokens, "beta": args.beta, "lr": args.lr,
             "out": out}
    return [sys.executable, str(REPO / "bench" / "trl_runner.py"), *as_flags(flags)]


def as_flags(flags: dict) -> list[str]:
    return [x for name, value in flags.items() for x in (f"--{name}", str(value))]


def peak_gib(train_py_value: float) -> float:
    """train.py's `peak_memory_gb` in GiB: ru_maxrss KiB / 1e6 on CPU, max_memory_allocated bytes / 1e9 on CUDA."""
    return train_py_value * 1e6 / 2**20 if not torch.cuda.is_available() else train_py_value * 1e9 / 2**30


def ours_stages(m: dict) -> dict:
    stages = {"generation": m["time_rollout"], "ref": m["time_ref_old_logprobs"],
              "fwd+bwd": m["time_forward_backward"], "constraint": m["time_constraint"],
              "optimizer": m["time_optimizer"], "total": m["time_step"]}
    stages["other"] = stages["total"] - sum(v for k, v in stages.items() if k != "total")
    return {**stages, "tokens": m["completion_length"], "peak_gib": peak_gib(m["peak_memory_gb"])}


def trl_stages(m: dict) -> dict:
    stages = {"generation": m["time_generation"], "ref": m["time_ref_logprobs"], "fwd": m["time_policy_forward"],
              "bwd": m["time_backward"], "optimizer": m["time_optimizer"], "total": m["time_step"]}
    stages["other"] = stages["total"] - sum(v for k, v in stages.items() if k != "total")
    stages["fwd+bwd"] = stages["fwd"] + stages["bwd"]
    return {**stages, "tokens": m["completion_length"], "peak_gib": m["peak_memory_gib"]}


def run_system(args, system: str) -> dict:
    """Run one system in its own process; the medians of its measured steps (or an error)."""
    out = args.out / system
    out.mkdir(parents=True, exist_ok=True)
    command = trl_command(args, out) if system == "trl" else ours_command(args, system, out)
    # A measurement, not a test: Triton's CPU interpreter would time Python, not the kernels' fallbacks.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = out / "log.txt"
    print(f"[{system}] running ({args.steps} steps), log in {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(shlex.join(command) + "\n\n")
        f.flush()
        rc = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    for name in ("final", f"checkpoint-{args.steps}"):  # train.py's weights and optimizer state: not needed here
        shutil.rmtree(out / name, ignore_errors=True)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(True)[-30:])
        print(f"[{system}] failed (exit {rc}); the end of its log:\n{tail}", file=sys.stderr)
        return {"error": f"exit {rc}"}
    print(f"[{system}] done in {time.perf_counter() - start:.0f} s", flush=True)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [(trl_stages if system == "trl" else ours_stages)(m) for m in steps]
    measured = per_step[args.warmup_steps:]
    result = {k: statistics.median(s[k] for s in measured) for k in measured[0]}
    result["peak_gib"] = per_step[-1]["peak_gib"]  # a running maximum: its value at the end of the last step
    if system == "trl":
        checked = json.loads((out / "summary.json").read_text())["prompts_checked"]
        print(f"[trl] prompt tokens identical to gtacore's for all {checked} prompts TRL generated from")
    return result


def environment() -> dict:
    commit = git_commit()

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return ""

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"machine": f"{platform.platform()} {platform.machine()}", "cpu": f"{cpu} x{os.cpu_count()}",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
            "trl": version("trl"), "commit": commit or "unknown", "command": shlex.join(sys.orig_argv)}


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def report(args, results: dict) -> None:
    env = environment()
    columns = [*STAGES, "tokens", "peak_gib"]
    rows = [{"system": NAMES[s], **(r if "error" not in r else {"total": r["error"]})} for s, r in results.items()]
    for a, b in RATIOS:  # only the stages both systems time separately
        ra, rb = results.get(a, {}), results.get(b, {})
        if "total" in ra and "total" in rb:
            ratio = {c: ra[c] / rb[c] if ra.get(c) is not None and rb.get(c) else None for c in RATIO_COLUMNS}
            rows.append({"system": f"{NAMES[a]} / {NAMES[b]}", **ratio})

    setup = (f"{args.prompts} prompts x G={args.group_size}, <= {args.max_new_tokens} new tokens, beta {args.beta}, "
             f"lr {args.lr}, {args.steps} steps (median of the last {args.steps - args.warmup_steps})")
    header = ["system", *columns]
    print(f"\n{setup}\n" + " | ".join(f"{k}={v}" for k, v in env.items()))
    print("seconds per step by stage; tokens = mean completion length; peak_gib = peak memory (GiB)")
    print("  ".join(f"{h:>14}" for h in header))
    for row in rows:
        print("  ".join(f"{fmt(row.get(h)):>14}" for h in header))

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header + ["settings", *env])
        writer.writeheader()
        for row in rows:
            cells = {h: "" if row.get(h) is None else row[h] for h in header}
            writer.writerow({**cells, "settings": setup, **env})
    markdown = [f"{setup}; {env['device']} ({env['cpu']}), torch {env['torch']}, transformers {env['transformers']}, "
                f"trl {env['trl']}, commit {env['commit'][:12]}{'+dirty' * env['commit'].endswith('+dirty')}.", "",
                "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    markdown += ["| " + " | ".join(fmt(row.get(h)) for h in header) + " |" for row in rows]
    (args.out / "results.md").write_text("\n".join(markdown) + "\n")
    print("\nmarkdown for bench/README.md:\n\n" + "\n".join(markdown))
    print(f"\nwrote {args.out / 'results.csv'} and {args.out / 'results.md'}")


def main():
    args = parse_args()
    if "trl" in args.systems:
        check_trl()
    args.model = (args.model or default_model_dir()).resolve()
    args.data, args.out = args.data.resolve(), args.out.resolve()
    results = {system: run_system(args, system) for system in args.systems}
    report(args, results)
    if any("error" in r for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
