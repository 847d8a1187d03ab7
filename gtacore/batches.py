"""Which examples each step trains on: a deterministic order, sharded over ranks, exactly resumable."""

from __future__ import annotations

import numpy as np

from .data import DataError


class BatchSampler:
    """Index batches for data-parallel training, exactly resumable.

    Epoch e is one permutation of range(n) drawn from numpy's default_rng seeded
    with (seed, e) (a pair, not seed + e, so that seed 1 does not replay seed 0's
    second epoch). Each step takes the next batch_size * world_size indices of
    it as the global batch, and rank r takes the r-th slice of batch_size: ranks
    see disjoint shards and their union is the global batch. The incomplete last
    global batch of an epoch is dropped, so every step has the same shape. The
    state is (epoch, step); the permutation is recomputed from it. `source` (the
    data file) only names the data in errors.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 source: str | None = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
            raise ValueError(
                f"need batch_size >= 1, world_size >= 1, 0 <= rank < world_size and seed >= 0; got "
                f"batch_size={batch_size}, world_size={world_size}, rank={rank}, seed={seed}"
            )
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise DataError(
                (f"{source}: " if source else "")
                + f"{n} examples are fewer than one global batch ({batch_size} per rank x {world_size} ranks "
                f"= {self.global_batch}); lower the batch size or add data"
            )
        self.steps_per_epoch = n // self.global_batch
        self.epoch, self.step = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def next_batch(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._perm_epoch = self.epoch
        start = self.step * self.global_batch + self.rank * self.batch_size
        batch = self._perm[start : start + self.batch_size].tolist()
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        # n, seed and global_batch are stored only to refuse a resume that would
        # silently see a different data order; a new world size with the same
        # global batch resumes exactly.
        return {"epoch": self.epoch, "step": self.step, "n": self.n, "seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["global_batch"] != self.global_batch:
            raise DataError(f"the checkpoint was trained with a global batch of {state['global_batch']} (--batch-size x ranks); "
                            f"this run has {self.global_batch}: resume with the same global batch so the data order continues")
        for key in ("n", "seed"):
            if state[key] != getattr(self, key):
                raise DataError(f"sampler state has {key}={state[key]} but this sampler has {getattr(self, key)}")
        if not (0 <= state["step"] < self.steps_per_epoch and state["epoch"] >= 0):
            raise DataError(f"sampler state {state} is out of range ({self.steps_per_epoch} steps per epoch)")
        self.epoch, self.step = state["epoch"], state["step"]
