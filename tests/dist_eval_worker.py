"""torchrun worker for tests/test_evaluate.py (2 ranks, gloo): evaluation sharded over ranks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_eval_worker.py MODEL DATA OUTDIR

For each of SETTINGS, every rank evaluates DATA with `info` and records its report,
the sizes of the batches it decoded itself (a hook on generate), and the gathered
predictions. Results go to OUTDIR/rank{r}.json.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch.distributed as dist

import gtacore.evaluate as ev
from gtacore import models
from gtacore.distributed import init_distributed, shutdown
from gtacore.run_data import load_dataset_from_args
from gtacore.models.tokenizer import Tokenizer

# (mode, max_new_tokens, max_prompt_tokens): one-token sft answers give a mixed confusion
# matrix; gta gives longer completions. The prompt limits cut the dataset's long texts only.
SETTINGS = [("sft", 1, 180), ("gta", 8, 400)]
BATCH_SIZE = 2


def load(model_dir: str, data: str):
    """(model, tokenizer, examples, labels): the same on every rank and in the test's single process."""
    test, _ = load_dataset_from_args(data, None, None, "text", "label", None, 0, 0)
    return models.load_pretrained(model_dir), Tokenizer(model_dir), test.examples, test.labels


def eval_args(model, tok, examples, labels, mode: str, max_new_tokens: int, max_prompt_tokens: int) -> tuple:
    """The positional arguments of evaluate and predict for one setting (no worked examples)."""
    return model, tok, examples, labels, mode, [], max_new_tokens, max_prompt_tokens, BATCH_SIZE


def main(model_dir: str, data: str, outdir: str) -> None:
    info = init_distributed("cpu")
    decoded = []  # this rank's batch sizes, as generate saw them
    real_generate = ev.generate

    def counting_generate(model, prompts, *args, **kwargs):
        decoded.append(len(prompts))
        return real_generate(model, prompts, *args, **kwargs)

    ev.generate = counting_generate
    model, tok, examples, labels = load(model_dir, data)
    out = {}
    try:
        for mode, max_new_tokens, max_prompt_tokens in SETTINGS:
            args = eval_args(model, tok, examples, labels, mode, max_new_tokens, max_prompt_tokens)
            decoded.clear()
            report = ev.evaluate(*args, truncate=True, info=info)
            batches = list(decoded)
            predictions = ev.predict(*args, truncate=True, info=info)
            out[mode] = {"report": report, "decoded_batches": batches,
                         "predictions": [dataclasses.asdict(p) for p in predictions]}
        dist.barrier()  # gloo: a rank that leaves while its last send is in flight aborts the other
    finally:
        shutdown(info)
    (Path(outdir) / f"rank{info.rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
