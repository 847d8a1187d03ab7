"""Greedy evaluation: accuracy, weighted/macro F1, per-class recall, format rate, guess accuracy,
guess->answer changes, and how the predictions spread over the labels (label collapse).

    python -m gtacore.evaluate --model DIR --data test.jsonl --train-data train.jsonl [--mode gta] [--shots 1]
    python -m gtacore.evaluate --run RUN_DIR        # a train.py run's "after" evaluation, again
    torchrun --nproc_per_node N -m gtacore.evaluate --run-dir RUN_DIR   # the same report, decoded by N ranks

With --run, the data, label set, worked examples, prompts and sizes come from the
run's config.json and the model from RUN_DIR/final; any other flag given overrides
the run's value (e.g. --max-examples 0 for the whole test set).

Across ranks, the batches of the one-process run are dealt round-robin: each rank
decodes whole batches, so every example is padded and decoded exactly as in one
process (greedy decoding is not bitwise independent of its batch: padding changes
the shapes and so the float rounding). The predictions are then gathered in order,
and every rank scores the same list: the report does not depend on the rank count.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gtacore import models
from gtacore.models.generate import SamplingParams, generate
from gtacore.models.tokenizer import Tokenizer

from .config import Config, add_config_flags, apply_flags, bound_problems, config_file_values
from .data import EVAL_SPLITS, Example
from .run_data import eval_subset, load_dataset_from_args, load_run_data
from .distributed import DistInfo, init_distributed, shutdown
from .parallel import compute_precision
from .metrics import classification_report, format_table, guess_answer_changes, label_counts, label_distribution
from .progress import Progress
from .errors import main_with_user_errors
from .run_dir import RunFolderError, check_model_dir
from .completions import parse_completion
from .prompts import make_prompts


@dataclass
class Prediction:
    """One example's greedy completion, parsed."""

    gold: str
    guess: str | None
    answer: str | None
    format_ok: bool
    truncated: bool  # its prompt was cut to fit max_prompt_tokens
    completion: str  # decoded without special tokens


def rank_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """The example indices of this rank's batches: batch b (examples b*batch_size onward) goes to rank b % world_size."""
    starts = range(0, n, batch_size)[rank::world_size]
    return [range(s, min(s + batch_size, n)) for s in starts]


@torch.no_grad()
def predict(model, tok: Tokenizer, data: list[Example], labels: list[str], mode: str, shots: list[Example],
            max_new_tokens: int, max_prompt_tokens: int, batch_size: int = 16, progress: bool = False,
            truncate: bool = False, *, system_prompt: str | None = None, template_system_prompt: bool = False,
            info: DistInfo | None = None) -> list[Prediction]:
    """Greedy-decode this rank's batches; return every example's prediction, in `data`'s order, on every rank.

    With `info` over several ranks the gather is the one collective: ranks may
    decode different numbers of batches. The progress bar counts rank 0's share.
    """
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    batches = rank_batches(len(data), batch_size, rank, world)
    was_training = model.training
    model.eval()
    mine = []  # [my batches][examples in the batch]
    bar = Progress(sum(len(b) for b in batches), "eval", enabled=progress and rank == 0)
    for batch in batches:
        chunk = [data[i] for i in batch]
        prompts = make_prompts(tok, chunk, labels, mode, shots, max_prompt_tokens, truncate,
                               system_prompt=system_prompt, template_system_prompt=template_system_prompt)
        gen = generate(model, [p.ids for p in prompts], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                       tok.stop_token_ids, tok.pad_token_id)
        lengths = gen.mask.sum(-1).tolist()
        predictions = []
        for r, prompt in enumerate(prompts):
            text = tok.decode(gen.tokens[r, : lengths[r]].tolist(), skip_special_tokens=True)
            parsed = parse_completion(text, labels, mode)
            predictions.append(Prediction(prompt.example.label, parsed.guess, parsed.answer, parsed.format_ok,
                                          prompt.truncated, text))
        mine.append(predictions)
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    per_rank = [mine]  # [ranks][their batches][examples]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)  # plain Python objects: works on gloo and NCCL alike
    num_batches = len(range(0, len(data), batch_size))
    return [p for b in range(num_batches) for p in per_rank[b % world][b // world]]


def score(predictions: list[Prediction], data: list[Example], labels: list[str], mode: str) -> dict:
    """The metrics dict (see the module docstring) of `data`'s predictions, with its first 5 completions."""
    golds = [p.gold for p in predictions]
    answers = [p.answer for p in predictions]
    report = classification_report(golds, answers, labels)
    report["format_rate"] = sum(p.format_ok for p in predictions) / max(len(predictions), 1)
    report["truncated_prompts"] = sum(p.truncated for p in predictions)
    report |= label_distribution("answer", label_counts(answers, labels))
    report |= {f"recall/{label}": s["recall"] for label, s in report["per_class"].items()}
    if mode == "gta":
        guesses = [p.guess for p in predictions]
        report |= label_distribution("guess", label_counts(guesses, labels))
        report["guess_accuracy"] = sum(g == y for g, y in zip(guesses, golds)) / max(len(golds), 1)
        report["guess_answer_changes"] = guess_answer_changes(golds, guesses, answers)
    report["samples"] = [{"text": ex.text, "gold": p.gold, "completion": p.completion}
                         for ex, p in zip(data[:5], predictions)]
    return report


def evaluate(model, tok: Tokenizer, data: list[Example], labels: list[str], mode: str, shots: list[Example],
             max_new_tokens: int, max_prompt_tokens: int, batch_size: int = 16, progress: bool = False,
             truncate: bool = False, *, system_prompt: str | None = None, template_system_prompt: bool = False,
             info: DistInfo | None = None) -> dict:
    """Greedy-decode every example (each rank its share, with `info`); return the metrics dict, the same on every rank."""
    predictions = predict(model, tok, data, labels, mode, shots, max_new_tokens, max_prompt_tokens, batch_size, progress,
                          truncate, system_prompt=system_prompt, template_system_prompt=template_system_prompt, info=info)
    return score(predictions, data, labels, mode)


def evaluate_with(cfg: Config, model, tok: Tokenizer, examples: list[Example], labels: list[str],
                  shots: list[Example], info: DistInfo, progress: bool) -> dict:
    """`evaluate` with a run's settings and under its precision: what train.py and this command run."""
    D = cfg.data
    with compute_precision(cfg.model.precision, info.device):
        return evaluate(model, tok, examples, labels, cfg.loss.mode, shots, cfg.rollout.max_new_tokens,
                        cfg.rollout.max_prompt_tokens, cfg.run.eval_batch_size, progress=progress,
                        truncate=cfg.rollout.long_prompts == "truncate", system_prompt=D.system_prompt,
                        template_system_prompt=D.template_system_prompt, info=info)


# --- the command ---

# The training config's fields this command takes: {(section, field): (flag, help or None for the field's)}.
FIELDS = {
    ("data", "eval_data"): ("--data", "evaluation file (.jsonl, .csv, .tsv, .parquet, .arrow) or a dataset export "
                                      "folder (its test split, else validation; FOLDER:SPLIT picks one)"),
    ("data", "data"): ("--train-data", "the training file: the label set and the worked examples come from it"),
    **{("data", n): ("--" + n.replace("_", "-"), None) for n in ("recipe", "text_field", "label_field", "labels",
                                                                 "label_names", "skip_unknown_labels", "shots",
                                                                 "system_prompt", "template_system_prompt")},
    ("data", "filter"): ("--filter", "read only rows where FIELD=VALUE (comma-separated: all must match) of the "
                                     "evaluation file and of --train-data, as the run did"),
    ("data", "max_eval_examples"): ("--max-examples", "evaluate on at most this many examples, a seeded sample (0 = all)"),
    ("loss", "mode"): ("--mode", "the output format to ask for and parse"),
    **{("rollout", n): ("--" + n.replace("_", "-"), None) for n in ("max_new_tokens", "max_prompt_tokens", "long_prompts")},
    ("run", "eval_batch_size"): ("--batch-size", None),
    ("run", "seed"): ("--seed", "seed for the worked examples and the --max-examples sample"),
    ("model", "precision"): ("--precision", "fp32, bf16-mixed (fp32 weights, bf16 autocast) or bf16-true (bf16 "
                                            "weights); with --run, the run's"),
    ("run", "device"): ("--device", None),
    ("run", "progress"): ("--progress", "show a progress bar"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --run-dir for torchrun, whose own parser takes "--run" for an abbreviation of its --run-path.
    ap.add_argument("--run", "--run-dir", metavar="RUN_DIR",
                    help="a train.py output folder: its config.json gives every setting below that is not given")
    ap.add_argument("--model", help="checkpoint folder (HF layout); with --run, default RUN/final")
    ap.add_argument("--output", help="write the metrics as JSON here")
    add_config_flags(ap, FIELDS)
    return ap


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's config (or the defaults, evaluating all examples), with the given flags on top."""
    if args.run:
        if not (Path(args.run) / "config.json").is_file():
            raise RunFolderError(f"--run {args.run}: no config.json here (a train.py output folder has one)")
        cfg = apply_flags(Config(), config_file_values(Path(args.run) / "config.json"))
    else:
        cfg = Config()
        cfg.data.max_eval_examples = 0
    return apply_flags(cfg, vars(args))


def load_eval_set(cfg: Config) -> tuple[list[Example], list[str], list[Example]]:
    """(examples, labels, worked examples) as train.py evaluates them (run_data.load_run_data); with
    no training file, the labels come from the evaluation file and there are no worked examples."""
    D = cfg.data
    if D.data:
        data = load_run_data(cfg)
        return data.eval_examples, data.labels, data.shots
    test, _ = load_dataset_from_args(D.eval_data, None, D.recipe, D.text_field, D.label_field, D.labels, 0, cfg.run.seed,
                                     D.skip_unknown_labels, filters=D.filter, splits=EVAL_SPLITS,
                                     label_names=D.label_names)
    return eval_subset(test.examples, D.max_eval_examples, cfg.run.seed), test.labels, []


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    for problem in bound_problems(cfg, FIELDS):
        ap.error(problem)
    D = cfg.data
    if not D.eval_data:
        ap.error("pass --data FILE (the evaluation file), or --run RUN_DIR of a run that had evaluation data")
    if D.shots > 0 and not D.data:
        ap.error(f"--shots {D.shots}: worked examples come from the training file, never the test file; "
                 "pass --train-data FILE, or --shots 0")
    model_dir = args.model or (str(Path(args.run) / "final") if args.run else None)
    if model_dir is None:
        ap.error("pass --model DIR, or --run RUN_DIR")

    examples, labels, shots = load_eval_set(cfg)
    info = init_distributed(cfg.run.device)  # one process, or torchrun's ranks sharing the examples
    try:
        # bf16-true: bf16 weights, fine for inference. train.py evaluated FSDP runs with its bf16 whole
        # copy under bf16-mixed (parallel.WholeModel).
        fsdp_copy = cfg.model.precision == "bf16-mixed" and args.run and cfg.run.shard == "fsdp"
        dtype = torch.bfloat16 if cfg.model.precision == "bf16-true" or fsdp_copy else torch.float32
        check_model_dir(model_dir)
        tok = Tokenizer(model_dir)
        tok.check_fits(models.ModelConfig.from_file(model_dir).vocab_size, model_dir)
        model = models.load_pretrained(model_dir, dtype=dtype, device=info.device)
        report = evaluate_with(cfg, model, tok, examples, labels, shots, info, progress=cfg.run.progress)
        if info.distributed:
            dist.barrier()  # gloo: a rank that leaves while its last send is in flight aborts the other
    finally:
        shutdown(info)
    if info.is_main:
        print(format_table(report))
        if args.output:
            Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main_with_user_errors(main)
