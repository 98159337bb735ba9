"""Seeded random subset: the meta dataset captions only a share of the curated selection.

Each key is kept or not by a hash of (seed, key), so the draw does not depend on shard order,
batching or how many times a run was resumed: the same seed picks the same samples. The
others are filtered with a reason, so every input still ends in exactly one place.
"""

from __future__ import annotations

import hashlib

from engine.config import SubsetConfig
from engine.record import Sample
from engine.stage import Resources, Stage


def in_subset(key: str, share: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


class SeededSubset(Stage):
    name = "subset"

    def __init__(self, cfg: SubsetConfig):
        self.cfg = cfg

    def resources(self) -> Resources:
        return Resources(batch_size=256)

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self.cfg.subset_share < 1.0:
            for sample in batch:
                if not in_subset(sample.key, self.cfg.subset_share, self.cfg.subset_seed):
                    sample.filter(self.name, f"outside the seeded subset "
                                             f"(share {self.cfg.subset_share}, seed {self.cfg.subset_seed})")
        return batch

    def describe(self) -> str:
        return f"subset (share {self.cfg.subset_share}, seed {self.cfg.subset_seed})"
