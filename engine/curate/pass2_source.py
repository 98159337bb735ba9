"""What pass 2 reads after curation: the selected samples, plus every other input sample as a
reject with the reason curation (or pass 1's filters) gave, so each input key ends somewhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from engine.core.config import RunConfig
from engine.core.record import Sample, ShardEnd, Source
from engine.curate.pass1 import curate_dir
from engine.curate.store import EmbeddingStore
from engine.io.readers import Selected, expand_shards, read_selected, shard_name

CURATE_STAGE = "curate"


def selected_source(cfg: RunConfig) -> Callable[[set[str]], Iterator[Sample | ShardEnd]]:
    items = selected_shard_items(cfg)
    paths = expand_shards(cfg.input.shards)

    def source(finished: set[str]) -> Iterator[Sample | ShardEnd]:
        for path in paths:
            if shard_name(path) not in finished:
                yield from items(path)

    return source


def selected_shard_items(cfg: RunConfig) -> Callable[[Path], Iterator[Sample | ShardEnd]]:
    """One input shard's items for pass 2 (what a Ray worker is given shard by shard)."""
    import pyarrow.parquet as pq

    root = curate_dir(cfg)
    store = EmbeddingStore(root)
    selection = pq.read_table(root / "selection.parquet").to_pylist()
    alt_texts = pq.read_table(root / "index.parquet", columns=["alt_text"]).column("alt_text").to_pylist()
    by_shard: dict[str, list[dict]] = {}
    for position, (row, alt) in enumerate(zip(selection, alt_texts)):
        row["alt_text"], row["row"] = alt, position
        by_shard.setdefault(row["shard"], []).append(row)
    ends = {name: (entry.get("samples", 0), tuple(entry.get("errors", ())),
                   tuple(tuple(r) for r in entry.get("skipped", ())), entry.get("unread_bytes", 0))
            for name, entry in store.manifest.entries()}
    rejects_by_shard: dict[str, list[dict]] = {}
    for row in store.rejects().to_pylist():
        rejects_by_shard.setdefault(row["shard"], []).append(row)

    def items(path: Path) -> Iterator[Sample | ShardEnd]:
        shard = shard_name(path)
        rows = by_shard.get(shard, [])
        kept_rows = [r for r in rows if r["kept"]]
        vectors = _embeddings(store, [r["row"] for r in kept_rows])
        kept = [Selected(r["key"], _source(r), r["alt_text"], v) for r, v in zip(kept_rows, vectors)]
        yield from read_selected(path, kept, cfg.input)
        for r in rows:
            if not r["kept"]:
                sample = Sample(key=r["key"], source=_source(r))
                sample.filter(CURATE_STAGE, r["reason"])
                yield sample
        for r in rejects_by_shard.get(shard, []):
            sample = Sample(key=r["key"], source=Source(shard, str(path), r["member"]))
            end = sample.filter if r["status"] == "filtered" else sample.fail
            end(r["stage"], r["reason"])
            yield sample
        yield ShardEnd(shard, str(path), *ends.get(shard, (0, (), (), 0)))

    return items


def _embeddings(store: EmbeddingStore, rows: list[int]) -> list:
    """Pass 1's embeddings of these rows (one shard's rows are contiguous: one read)."""
    if not rows:
        return []
    block = store.embeddings()[min(rows):max(rows) + 1]
    return list(block[np.asarray(rows) - min(rows)].astype(np.float32))


def _source(row: dict) -> Source:
    return Source(row["shard"], row["path"], row["member"], row["offset"], row["size"])
