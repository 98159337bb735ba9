"""The manifest of finished shards: what a rerun skips. It grows by one appended line per
committed shard, so a commit costs the same at the 50,000th shard as at the first (rewriting
one JSON document made it 37 ms at 1,000 shards and 710 ms at 20,000: ``python -m bench scale``).

    manifest.jsonl   {"shard": name, ...its marker...} per finished shard, in commit order;
                     a line without "shard" sets a property of the output (pass 1's embed_model)

Only the one driver of a run writes it; it is derived from the per-shard done markers
(engine/io/commit.py), which are the source of truth, and adds what only the driver knows
(e.g. where a shard's embeddings start in the store). A driver killed in the middle of an
append leaves a torn last line: readers skip it and the next append cuts it off (the shard's
marker brings it back at the next run's settle). An output written before the manifest was
appended (``manifest.json``, one document) is read as it is and converted at the first append.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"
LEGACY_MANIFEST = "manifest.json"


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
    """The manifest of the output folder ``folder``. Holds in memory only the finished shards'
    names and the properties, read at their first use (``stats`` and ``report`` only stream
    :meth:`entries` from the file, in memory bounded whatever the number of shards)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / MANIFEST
        self.legacy = Path(folder) / LEGACY_MANIFEST
        self._read: tuple[set[str], dict[str, Any]] | None = None

    @property
    def finished(self) -> set[str]:
        return self._names_and_properties()[0]

    @property
    def properties(self) -> dict[str, Any]:
        return self._names_and_properties()[1]

    def _names_and_properties(self) -> tuple[set[str], dict[str, Any]]:
        if self._read is None:
            finished, properties = set(), {}
            for line in self._lines():
                if "shard" in line:
                    finished.add(line["shard"])
                else:
                    properties.update(line)
            self._read = finished, properties
        return self._read

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every finished shard's entry (its marker's contents), in commit order."""
        for line in self._lines():
            if "shard" in line:
                yield line.pop("shard"), line

    def record(self, entries: dict[str, dict[str, Any]]) -> None:
        """Add finished shards (their markers' contents): one appended line each."""
        self._append([{"shard": shard, **entry} for shard, entry in entries.items()])
        self.finished.update(entries)

    def setdefault(self, key: str, value: Any) -> Any:
        """A property of the output: recorded with ``value`` the first time, read back after."""
        if key not in self.properties:
            self._append([{key: value}])
            self.properties[key] = value
        return self.properties[key]

    def _lines(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            if self.legacy.exists():
                data = json.loads(self.legacy.read_text(encoding="utf-8"))
                shards = data.pop("shards", {})
                data.pop("version", None)
                if data:
                    yield data
                yield from ({"shard": name, **entry} for name, entry in shards.items())
            return
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if line.endswith("\n"):  # else torn by a kill mid-append
                    yield json.loads(line)

    def _append(self, lines: list[dict[str, Any]]) -> None:
        if not self.path.exists():
            self._start()
        with open(self.path, "r+b") as handle:
            end = handle.seek(0, os.SEEK_END)
            if end and (handle.seek(end - 1), handle.read(1))[1] != b"\n":
                handle.truncate(self._last_newline(handle, end))  # a torn line: its marker restores it
            handle.seek(0, os.SEEK_END)
            handle.write(b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())

    def _start(self) -> None:
        """A new manifest, holding an older output's ``manifest.json`` if there is one."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in self._lines()))
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self.legacy.unlink(missing_ok=True)
        fsync_dir(self.path.parent)

    @staticmethod
    def _last_newline(handle, end: int) -> int:
        """The offset just past the last newline before ``end`` (0 when there is none)."""
        block = 1 << 16
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            found = handle.read(end - start).rfind(b"\n")
            if found >= 0:
                return start + found + 1
            end = start
        return 0


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The finished shards of the output folder ``folder`` with their entries, all at once ({} when
    none): for tests and small outputs; the engine streams :meth:`Manifest.entries`."""
    return dict(Manifest(folder).entries())
