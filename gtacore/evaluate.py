"""Greedy evaluation: accuracy, weighted/macro F1, format rate, guess accuracy, guess->answer changes.

    python -m gtacore.evaluate --model DIR --data test.jsonl [--mode gta] [--shots 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.generate import SamplingParams, generate
from models.tokenizer import Tokenizer

from .data import Example
from .metrics import classification_report, format_table, guess_answer_changes
from .progress import Progress
from .prompts import parse_completion
from .rollout import make_prompts


@torch.no_grad()
def evaluate(model, tok: Tokenizer, data: list[Example], labels: list[str], mode: str, shots: list[Example],
             max_new_tokens: int, max_prompt_tokens: int, batch_size: int = 16, progress: bool = False,
             truncate: bool = False) -> dict:
    """Greedy-decode every example; return the metrics dict (see module docstring)."""
    was_training = model.training
    model.eval()
    golds, guesses, answers, formats, samples = [], [], [], [], []
    truncated = 0
    bar = Progress(len(data), "eval", enabled=progress)
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        prompts = make_prompts(tok, chunk, labels, mode, shots, max_prompt_tokens, truncate)
        truncated += sum(p.truncated for p in prompts)
        gen = generate(model, [p.ids for p in prompts], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                       tok.stop_token_ids, tok.pad_token_id)
        lengths = gen.mask.sum(-1).tolist()
        for r, ex in enumerate(chunk):
            text = tok.decode(gen.tokens[r, : lengths[r]].tolist(), skip_special_tokens=True)
            parsed = parse_completion(text, labels, mode)
            golds.append(ex.label)
            guesses.append(parsed.guess)
            answers.append(parsed.answer)
            formats.append(parsed.format_ok)
            if len(samples) < 5:
                samples.append({"text": ex.text, "gold": ex.label, "completion": text})
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    report = classification_report(golds, answers, labels)
    report["format_rate"] = sum(formats) / max(len(formats), 1)
    report["truncated_prompts"] = truncated
    if mode == "gta":
        report["guess_accuracy"] = sum(g == y for g, y in zip(guesses, golds)) / max(len(golds), 1)
        report["guess_answer_changes"] = guess_answer_changes(golds, guesses, answers)
    report["samples"] = samples
    return report


def main(argv=None) -> None:
    from models import load_pretrained

    from .loading import load_dataset_from_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (HF layout)")
    ap.add_argument("--data", required=True, help="evaluation file (.jsonl, .csv, .tsv, .parquet)")
    ap.add_argument("--train-data", help="file to draw the worked examples from (default: --data)")
    ap.add_argument("--mode", default="gta", choices=("gta", "sft", "grpo"))
    ap.add_argument("--recipe", help="field/label recipe (sst5, emotion, massive, bbc_news)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--label-field", default="label")
    ap.add_argument("--labels", help="comma-separated label set or a file with one label per line")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--long-prompts", default="truncate", choices=("truncate", "error"),
                    help="a prompt over --max-prompt-tokens: cut its text to fit (counted), or fail naming the row")
    ap.add_argument("--max-examples", type=int, default=0, help="0 = all")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output", help="write the metrics as JSON here")
    args = ap.parse_args(argv)

    data, shots = load_dataset_from_args(args.data, args.train_data or args.data, args.recipe, args.text_field,
                                         args.label_field, args.labels, args.shots, args.seed)
    examples = data.examples[: args.max_examples or None]
    model = load_pretrained(args.model, device=args.device)
    tok = Tokenizer(args.model)
    report = evaluate(model, tok, examples, data.labels, args.mode, shots, args.max_new_tokens, args.max_prompt_tokens,
                      args.batch_size, progress=True, truncate=args.long_prompts == "truncate")
    print(format_table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
