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

On object storage nothing can be appended, so the manifest is numbered segment objects:

    manifest/<n>.jsonl   the same lines; an invocation's driver writes its own segments, each
                         rewritten whole (one PUT, atomic) per commit until it holds
                         ``SEGMENT_LINES`` lines, then the next: a commit costs at most one
                         segment's bytes, and a rerun reads a few hundred objects at 50,000 shards

A driver killed before a PUT loses the lines since the last one; the markers bring them back at
the next run's settle, as for a torn line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.io.object_output import ObjectPath, OutPath, read_objects

MANIFEST = "manifest.jsonl"
LEGACY_MANIFEST = "manifest.json"
SEGMENTS = "manifest"  # on object storage: the folder of numbered segments
SEGMENT_LINES = 512
_READ_AT_ONCE = 32  # segments fetched concurrently: bounded memory over any number of them


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: OutPath, data: Any) -> None:
    if isinstance(path, ObjectPath):  # replacing an object whole is atomic
        path.write_bytes(json.dumps(data, indent=2, ensure_ascii=False).encode())
        return
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

    def __init__(self, folder: OutPath):
        self.log = SegmentLog(folder / SEGMENTS) if isinstance(folder, ObjectPath) else LineFile(Path(folder))
        self.path = self.log.path
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
            for line in self.log.lines():
                if "shard" in line:
                    finished.add(line["shard"])
                else:
                    properties.update(line)
            self._read = finished, properties
        return self._read

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every finished shard's entry (its marker's contents), in commit order."""
        for line in self.log.lines():
            if "shard" in line:
                yield line.pop("shard"), line

    def record(self, entries: dict[str, dict[str, Any]]) -> None:
        """Add finished shards (their markers' contents): one appended line each."""
        self.log.append([{"shard": shard, **entry} for shard, entry in entries.items()])
        self.finished.update(entries)

    def setdefault(self, key: str, value: Any) -> Any:
        """A property of the output: recorded with ``value`` the first time, read back after."""
        if key not in self.properties:
            self.log.append([{key: value}])
            self.properties[key] = value
        return self.properties[key]


def _encoded(lines: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines]


class LineFile:
    """The manifest on a filesystem: ``manifest.jsonl``, appended (an output copied down from
    object storage has segments instead: read, and converted at the first append)."""

    def __init__(self, folder: Path):
        self.path = folder / MANIFEST
        self.legacy = folder / LEGACY_MANIFEST

    def lines(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            for segment in self._segments():  # an output copied down from object storage
                yield from (json.loads(line) for line in segment.read_text(encoding="utf-8").splitlines() if line)
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

    def append(self, lines: list[dict[str, Any]]) -> None:
        if not self.path.exists():
            self._start()
        with open(self.path, "r+b") as handle:
            end = handle.seek(0, os.SEEK_END)
            if end and (handle.seek(end - 1), handle.read(1))[1] != b"\n":
                handle.truncate(self._last_newline(handle, end))  # a torn line: its marker restores it
            handle.seek(0, os.SEEK_END)
            handle.write(b"".join(_encoded(lines)))
            handle.flush()
            os.fsync(handle.fileno())

    def _start(self) -> None:
        """A new manifest, holding an older output's ``manifest.json`` or segments if there are."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(b"".join(_encoded(list(self.lines()))))
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self.legacy.unlink(missing_ok=True)
        for segment in self._segments():
            segment.unlink()
        fsync_dir(self.path.parent)

    def _segments(self) -> list[Path]:
        return sorted((self.path.parent / SEGMENTS).glob("*.jsonl"))

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


class SegmentLog:
    """The manifest on object storage: ``manifest/<n>.jsonl`` segments (module docstring). This
    driver's first segment comes after every existing one and is created conditionally, so two
    drivers never write one segment."""

    def __init__(self, folder: ObjectPath):
        self.path = folder
        self._number: int | None = None  # this driver's open segment
        self._open: list[bytes] = []  # its lines
        self._created = False

    def _names(self) -> list[str]:
        return sorted(name for name in self.path.names() if name.endswith(".jsonl"))

    def lines(self) -> Iterator[dict[str, Any]]:
        names = self._names()
        for start in range(0, len(names), _READ_AT_ONCE):
            for data in read_objects([self.path / name for name in names[start:start + _READ_AT_ONCE]]):
                yield from (json.loads(line) for line in data.splitlines() if line)

    def append(self, lines: list[dict[str, Any]]) -> None:
        encoded = _encoded(lines)
        while encoded:
            if self._number is None or len(self._open) >= SEGMENT_LINES:
                names = self._names()
                self._number = (int(names[-1].split(".")[0]) + 1) if names else 0
                self._open, self._created = [], False
            room = SEGMENT_LINES - len(self._open)
            self._open += encoded[:room]
            encoded = encoded[room:]
            self._put()

    def _put(self) -> None:
        data = b"".join(self._open)
        if self._created:
            (self.path / self._name()).write_bytes(data)
            return
        while not (self.path / self._name()).create(data):  # another driver took this number
            self._number += 1
        self._created = True

    def _name(self) -> str:
        return f"{self._number:08d}.jsonl"


def read_manifest(folder: OutPath) -> dict[str, dict[str, Any]]:
    """The finished shards of the output folder ``folder`` with their entries, all at once ({} when
    none): for tests and small outputs; the engine streams :meth:`Manifest.entries`."""
    return dict(Manifest(folder).entries())
