"""train.py with one injected fault, for tests/test_reliability_train.py (run directly or under torchrun).

    python tests/train_with_faults.py FAULT TRAIN_ARGS...

FAULT:
    raise-on-rank-1      rank 1 raises in its second step (rank 0 is then waiting in a collective)
    nan-on-rank-1        rank 1's RL gradient gets a NaN in the first update of step 2 (before
                         DDP's all-reduce; after FSDP's reduce-scatter, in rank 1's shard only)
    stall-in-save:MARKER the second checkpoint write stops after its weights file: it
                         touches MARKER and sleeps, so the test can SIGKILL it mid-write
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtacore.models import checkpoint as model_checkpoint  # noqa: E402
import train  # noqa: E402


def raise_on_rank_1() -> None:
    real = train.train_step

    def step(cfg, step, *args, **kwargs):
        if int(os.environ.get("RANK", 0)) == 1 and step == 1:
            raise RuntimeError("injected failure on rank 1 at step 2")
        return real(cfg, step, *args, **kwargs)

    train.train_step = step


def nan_on_rank_1() -> None:
    from gtacore.parallel import local

    real, calls = train.forward_backward, {"n": 0}

    def backward(*args, **kwargs):
        results = real(*args, **kwargs)
        if int(os.environ.get("RANK", 0)) == 1 and calls["n"] == 2:  # mu = 2: call 2 is step 2's first update
            shard = next(local(g) for g in results[-1].grads if g is not None and local(g).numel() > 0)
            shard.view(-1)[0] = float("nan")
        calls["n"] += 1
        return results

    train.forward_backward = backward


def stall_in_save(marker: str) -> None:
    real = model_checkpoint.save_file
    calls = {"weights": 0}

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if Path(filename).name.startswith("model"):
            calls["weights"] += 1
            if calls["weights"] == 2:
                Path(marker).touch()
                time.sleep(600)

    model_checkpoint.save_file = save_file


if __name__ == "__main__":
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault == "raise-on-rank-1":
        raise_on_rank_1()
    elif fault == "nan-on-rank-1":
        nan_on_rank_1()
    elif fault.startswith("stall-in-save:"):
        stall_in_save(fault.split(":", 1)[1])
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    train.main(argv)
