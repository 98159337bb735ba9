"""The manifest of finished shards: what a rerun skips. Rewritten atomically on every change.

Only the one driver of a run writes it; it is derived from the per-shard done markers
(engine/io/commit.py), which are the source of truth, and adds what only the driver knows
(e.g. where a shard's embeddings start in the store)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_parquet_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"version": 1, "shards": {}}
        if path.exists():
            self.data = json.loads(path.read_text(encoding="utf-8"))

    @property
    def finished(self) -> set[str]:
        return set(self.data["shards"])

    def record(self, entries: dict[str, dict[str, Any]]) -> None:
        """Add finished shards (their markers' contents) and rewrite the file."""
        self.data["shards"].update(entries)
        write_json_atomic(self.path, self.data)
