"""Seeded random subset of the inputs: the meta dataset captions only a share of them.

Each key is kept or not by a hash of (seed, key), so the draw does not depend on shard order,
batching or how many times a run was resumed: the same seed picks the same samples. It runs
on the reader's output, before any stage, so samples left out cost nothing; they are
filtered with a reason (stage ``subset``), so every input still ends in exactly one place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from engine.core.config import SubsetConfig
from engine.core.record import Sample, ShardEnd

STAGE = "subset"


def in_subset(key: str, share: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


def take_subset(items: Iterator[Sample | ShardEnd], cfg: SubsetConfig) -> Iterator[Sample | ShardEnd]:
    if cfg.subset_share >= 1.0:
        yield from items
        return
    reason = f"outside the seeded subset (share {cfg.subset_share}, seed {cfg.subset_seed})"
    for item in items:
        if isinstance(item, Sample) and item.alive and not in_subset(item.key, cfg.subset_share, cfg.subset_seed):
            item.filter(STAGE, reason)
        yield item
