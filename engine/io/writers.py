"""Writers: the output contract, committed per shard, atomically.

    OUT/shards/<shard>.tar       WebDataset: <key>.jpg original bytes, <key>.json annotations
    OUT/shards/<shard>.parquet   one row per written sample
    OUT/rejects/<shard>.parquet  one row per sample not written: key, stage, status, reason
    OUT/manifest.json            finished shards with their counts

Files grow under temporary names and are renamed into place only when the shard's
:class:`ShardEnd` arrives (fsync first), then the manifest records the shard. A crash at any
point leaves the shard out of the manifest, so a rerun redoes it and overwrites whatever a
half-finished commit left behind.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from engine.core.record import Sample, ShardEnd
from engine.io.manifest import Manifest, fsync_dir, write_parquet_atomic

_TMP = ".tmp"
# Every image member is named <key>.jpg whatever its format (the bytes are the original file's,
# its format is in the JSON's "image_format"): loaders such as Hugging Face datasets infer one set
# of fields from the first samples and drop images stored under any other extension. Decoders
# (PIL, webdataset's "pil" decoder, LLaVA's loaders) read the format from the bytes.
IMAGE_MEMBER_EXT = "jpg"

_XYXY = pa.list_(pa.float64())
SCHEMA_FIELDS = {
    "key": pa.string(),
    "shard": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "alt_text": pa.string(),
    "url": pa.string(),
    "image_format": pa.string(),
    "tags": pa.list_(pa.struct([("name", pa.string()), ("score", pa.float64())])),
    "boxes": pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64()),
                                 ("xyxy", _XYXY), ("source", pa.string())])),
    "ocr": pa.list_(pa.struct([("text", pa.string()), ("score", pa.float64()), ("xyxy", _XYXY)])),
    "prompt": pa.string(),
    "caption": pa.string(),
    "engine": pa.struct([("model", pa.string()), ("backend", pa.string()),
                         ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()),
                         ("finish_reason", pa.string()), ("seconds", pa.float64())]),
    "flags": pa.list_(pa.string()),
}
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("member", pa.string()),
                          ("stage", pa.string()), ("status", pa.string()), ("reason", pa.string())])


def parquet_row(annotations: dict[str, Any]) -> dict[str, Any]:
    """Typed columns for the known fields; anything else (``meta``, ``scores``, fields later
    stages add) as a JSON string, so the schema never depends on what one shard happened to hold."""
    row = {name: annotations.get(name) for name in SCHEMA_FIELDS}
    row["url"] = str(annotations.get("meta", {}).get("url") or "")
    row["engine"] = annotations.get("engine") or None
    for name, value in annotations.items():
        if name not in SCHEMA_FIELDS:
            row[name] = json.dumps(value, ensure_ascii=False)
    return row


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    extra = sorted({k for row in rows for k in row} - set(SCHEMA_FIELDS))
    schema = pa.schema(list(SCHEMA_FIELDS.items()) + [(name, pa.string()) for name in extra])
    return pa.Table.from_pylist(rows, schema=schema)


@dataclass
class _OpenShard:
    tar: tarfile.TarFile
    tar_path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)


class DatasetWriter:
    """Writes samples to their shard's temporary files; ``commit`` makes a shard final."""

    def __init__(self, out: Path, manifest: Manifest):
        self.out, self.manifest = out, manifest
        (out / "shards").mkdir(parents=True, exist_ok=True)
        (out / "rejects").mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob(f"shards/*{_TMP}")) + list(out.glob(f"rejects/*{_TMP}")):
            stale.unlink()  # a killed run's unfinished shard; it is redone from the input
        self._open: dict[str, _OpenShard] = {}
        self.written = 0
        self.rejected = 0

    def write(self, sample: Sample) -> None:
        shard = self._shard(sample.source.shard)
        if sample.alive:
            self._add_member(shard.tar, f"{sample.key}.{IMAGE_MEMBER_EXT}", sample.image_bytes)
            annotations = sample.annotations()
            self._add_member(shard.tar, f"{sample.key}.json",
                             json.dumps(annotations, ensure_ascii=False).encode())
            shard.rows.append(parquet_row(annotations))
            self.written += 1
        else:
            shard.rejects.append({"key": sample.key, "shard": sample.source.shard,
                                  "member": sample.source.member, "stage": sample.stage,
                                  "status": sample.status, "reason": sample.reason})
            self.rejected += 1

    def commit(self, end: ShardEnd) -> None:
        shard = self._open.pop(end.shard, None) or self._shard_new(end.shard)
        shard.tar.close()
        _fsync(shard.tar_path)
        os.replace(shard.tar_path, shard.tar_path.with_name(shard.tar_path.name[: -len(_TMP)]))
        write_parquet_atomic(rows_to_table(shard.rows), self.out / "shards" / f"{end.shard}.parquet")
        write_parquet_atomic(pa.Table.from_pylist(shard.rejects, schema=REJECT_SCHEMA),
                             self.out / "rejects" / f"{end.shard}.parquet")
        fsync_dir(self.out / "shards")
        fsync_dir(self.out / "rejects")
        self.manifest.finish(end.shard, path=end.path, samples=end.n_samples,
                             written=len(shard.rows), rejected=len(shard.rejects),
                             errors=list(end.errors))

    def close(self) -> None:
        """Abandon unfinished shards (a stop before their end): their temporaries are removed."""
        for shard in self._open.values():
            shard.tar.close()
            shard.tar_path.unlink(missing_ok=True)
        self._open.clear()

    def _shard(self, name: str) -> _OpenShard:
        if name not in self._open:
            self._open[name] = self._shard_new(name)
        return self._open[name]

    def _shard_new(self, name: str) -> _OpenShard:
        tar_path = self.out / "shards" / f"{name}.tar{_TMP}"
        return _OpenShard(tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT), tar_path)

    @staticmethod
    def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: reruns are byte-identical
        tar.addfile(info, io.BytesIO(data))


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
