"""Writers: the output contract, committed per shard, atomically.

    OUT/shards/<shard>.tar       WebDataset: <key>.jpg original bytes, <key>.json annotations
    OUT/shards/<shard>.parquet   one row per written sample
    OUT/rejects/<shard>.parquet  one row per sample not written: key, stage, status, reason
    OUT/markers/<shard>.json     the shard's done marker: counts, file hashes, attempt, node
    OUT/manifest.jsonl           a line per finished shard (derived from the markers): keys read (``samples``),
                                 written, rejected, shard-level errors, byte ranges a damaged input lost

Files grow under temporary names unique to this writer and are published when the shard's
:class:`ShardEnd` arrives, each with a no-replace link (a conditional create on object storage),
then the shard's done marker (engine/io/commit.py: the one protocol of the single-node run and
of Ray workers). A crash before the marker leaves the shard unfinished: a rerun completes the
marker from the published files if they are all there, and otherwise redoes the shard, keeping
any file already published.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from engine.core.record import Sample, ShardEnd
from engine.core.registry import evidence_kinds
from engine.evidence.category import category_score_names
from engine.evidence.coverage import COVERAGE_SCORES
from engine.evidence.kinds import BOXES, OCR, TAGS
from engine.io.commit import (
    MARKERS_DIR,
    ShardMarkers,
    file_label,
    listed,
    parquet_rows,
    publish,
    publish_parquet,
    remove_stale_temporaries,
    shard_info,
    temp_path,
)
from engine.io.manifest import Manifest
from engine.io.object_output import OutPath
from engine.io.text import valid_utf8

# Every image member is named <key>.jpg whatever its format (the bytes are the original file's,
# its format is in the JSON's "image_format"): loaders such as Hugging Face datasets infer one set
# of fields from the first samples and drop images stored under any other extension. Decoders
# (PIL, webdataset's "pil" decoder, LLaVA's loaders) read the format from the bytes.
IMAGE_MEMBER_EXT = "jpg"

# ``meta`` and ``scores`` are structs with fixed fields, so every shard has the same schema
# whatever it held, and datasets/pandas users filter on them (``r["scores"]["cov_tags"]``).
# (Hugging Face ``datasets`` cannot load Arrow's map type.) ``meta`` declares the fields
# img2dataset writes and our readers and probe add; ``scores`` the names the score and category
# stages write. Anything else, or a value of another type, goes to ``other``: a JSON object text.
OTHER = "other"
META_FIELDS = {
    **dict.fromkeys(("url", "caption", "key", "status", "error_message", "sha256", "exif", "meta_error"), pa.string()),
    **dict.fromkeys(("width", "height", "original_width", "original_height"), pa.int64()),
}
SCORE_FIELDS = dict.fromkeys((*COVERAGE_SCORES, *category_score_names()), pa.float64())


def _struct(fields: dict[str, pa.DataType]) -> pa.StructType:
    return pa.struct([*fields.items(), (OTHER, pa.string())])


SCHEMA_FIELDS = {
    "key": pa.string(),
    "shard": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "alt_text": pa.string(),
    "url": pa.string(),
    "image_format": pa.string(),
    **{kind.name: kind.parquet_type for kind in (TAGS, BOXES, OCR)},
    "prompt": pa.string(),
    "caption": pa.string(),
    "engine": pa.struct([("model", pa.string()), ("backend", pa.string()),
                         ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()),
                         ("finish_reason", pa.string()), ("seconds", pa.float64())]),
    "flags": pa.list_(pa.string()),
    "meta": _struct(META_FIELDS),
    "scores": _struct(SCORE_FIELDS),
}
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("member", pa.string()),
                          ("stage", pa.string()), ("status", pa.string()), ("reason", pa.string())])


def parquet_row(annotations: dict[str, Any]) -> dict[str, Any]:
    """Typed columns for the known fields and the plugins' evidence kinds (their declared parquet
    type); anything else (fields later stages add) as a JSON string, so the schema never depends
    on what one shard happened to hold."""
    row = {name: annotations.get(name) for name in SCHEMA_FIELDS}
    meta = annotations.get("meta") or {}
    row["url"] = str(meta.get("url") or "")
    row["engine"] = annotations.get("engine") or None
    row["meta"] = struct_row(meta, META_FIELDS)
    row["scores"] = struct_row(annotations.get("scores") or {}, SCORE_FIELDS)
    kinds = evidence_kinds()
    for name, value in annotations.items():
        if name not in SCHEMA_FIELDS:
            row[name] = value if name in kinds else json.dumps(value, ensure_ascii=False)
    return row


_INT64 = range(-(2**63), 2**63)


def struct_row(values: dict[str, Any], fields: dict[str, pa.DataType]) -> dict[str, Any]:
    """``values`` as a row of ``_struct(fields)``: a declared field of its type, else under ``other``
    (source metadata is whatever the input held: a width of "640" must not fail the shard)."""
    row: dict[str, Any] = dict.fromkeys(fields)
    other = {}
    for name, value in values.items():
        kind = fields.get(name)
        if value is None and kind is not None:
            continue
        if kind == pa.string() and isinstance(value, str):
            row[name] = value
        elif kind == pa.int64() and isinstance(value, int) and not isinstance(value, bool) and value in _INT64:
            row[name] = value
        elif kind == pa.float64() and isinstance(value, (int, float)) and not isinstance(value, bool):
            row[name] = float(value)
        else:
            other[name] = value
    row[OTHER] = json.dumps(other, ensure_ascii=False) if other else None
    return row


def rows_to_table(rows: list[dict[str, Any]], evidence: tuple[str, ...] = ()) -> pa.Table:
    """``evidence``: the plugins' kinds of this run, a column in every shard (even one with no
    row); a kind's column has its declared type."""
    kinds = evidence_kinds()
    extra = sorted(({k for row in rows for k in row} | set(evidence)) - set(SCHEMA_FIELDS))
    schema = pa.schema(list(SCHEMA_FIELDS.items())
                       + [(name, kinds[name].parquet_type if name in kinds else pa.string()) for name in extra])
    return pa.Table.from_pylist(rows, schema=schema)


@dataclass
class _OpenShard:
    tar: tarfile.TarFile
    tar_path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)


class DatasetWriter:
    """Writes samples to their shard's temporary files; ``commit`` publishes a shard (the
    driver's :class:`engine.core.sink.Sink`).

    ``manifest`` is the driver's: given, each commit is recorded there too (one process runs
    everything). A Ray worker passes none and returns its markers to the driver instead; it also
    leaves other writers' temporaries alone (``clean=False``) and sets ``attempts`` (which try
    of a shard this is, recorded in its marker; 1 when unset). ``evidence``: the plugins' evidence
    kinds of the run, a parquet column each."""

    def __init__(self, out: OutPath, manifest: Manifest | None, *, clean: bool = True,
                 evidence: tuple[str, ...] = ()):
        self.out, self.manifest, self.evidence = out, manifest, evidence
        self.attempts: dict[str, int] = {}
        self.node = ""  # recorded in markers (default: the host name; a Ray worker adds its node address)
        for folder in ("shards", "rejects"):
            (out / folder).mkdir(parents=True, exist_ok=True)
        self.markers = ShardMarkers(out / MARKERS_DIR)
        if clean:
            self.remove_temporaries()
        self._open: dict[str, _OpenShard] = {}
        self.committed: dict[str, dict[str, Any]] = {}  # shard → its marker, for this writer's commits
        self.written = 0
        self.rejected = 0

    def remove_temporaries(self) -> None:
        """Unfinished shards of writers no longer alive (a killed run, copies stopped at the end
        of a Ray run); they are redone from the input if they were not committed."""
        for folder in ("shards", "rejects", MARKERS_DIR):
            remove_stale_temporaries(self.out / folder)

    def files(self, shard: str) -> list[OutPath]:
        """A shard's published files, in publishing order (the last one carries the shard's facts)."""
        return [self.out / "shards" / f"{shard}.tar", self.out / "shards" / f"{shard}.parquet",
                self.out / "rejects" / f"{shard}.parquet"]

    def settle(self, shards: list[str]) -> None:
        """Bring the manifest up to the markers (the truth): a shard whose files were all
        published by a writer killed before its marker gets its marker from those files,
        without being redone; a marker the manifest lacks (killed before recording) is recorded.
        Reads only the markers' names, and the markers the manifest lacks (a rerun over 50,000
        finished shards reads none); with shards unmarked, one listing of the published files."""
        marked = self.markers.names()
        unmarked = [shard for shard in shards if shard not in marked]
        published = {folder: listed(self.out / folder) for folder in ("shards", "rejects")} if unmarked else {}
        for shard in unmarked:
            files = self.files(shard)
            if all(path.name in published[path.parent.name] for path in files) and self.markers.complete(
                    shard, files, files[2], {"written": parquet_rows(files[1]), "rejected": parquet_rows(files[2])}):
                marked.add(shard)
        missing = self.markers.unrecorded(self.manifest.finished, marked)
        if missing:
            self.manifest.record(missing)

    @property
    def finished(self) -> set[str]:
        return self.manifest.finished

    def adopt(self, markers: dict[str, dict[str, Any]]) -> None:
        """The driver's side of other writers' commits (Ray workers): record their markers."""
        self.manifest.record(markers)

    def write(self, sample: Sample) -> None:
        # valid_utf8: whatever a reader or stage left in a string (a lone surrogate from a JSON
        # escape), what is written is valid UTF-8; the readers' keys already are
        shard = self._shard(sample.source.shard)
        if sample.alive:
            annotations = valid_utf8(sample.annotations())
            key = annotations["key"]
            self._add_member(shard.tar, f"{key}.{IMAGE_MEMBER_EXT}", sample.image_bytes)
            self._add_member(shard.tar, f"{key}.json", json.dumps(annotations, ensure_ascii=False).encode())
            shard.rows.append(parquet_row(annotations))
            self.written += 1
        else:
            shard.rejects.append(valid_utf8({"key": sample.key, "shard": sample.source.shard,
                                             "member": sample.source.member, "stage": sample.stage,
                                             "status": sample.status, "reason": sample.reason}))
            self.rejected += 1

    def commit(self, end: ShardEnd) -> None:
        shard = self._open.pop(end.shard, None) or self._shard_new(end.shard)
        shard.tar.close()
        tar, rows, rejects = self.files(end.shard)
        hashes = {file_label(tar): publish(shard.tar_path, tar),
                  file_label(rows): publish_parquet(rows_to_table(shard.rows, self.evidence), rows)}
        info = {**shard_info(end, self.attempts.get(end.shard, 1), self.node),
                "written": len(shard.rows), "rejected": len(shard.rejects),
                "rejected_by_stage": dict(Counter(r["stage"] or "?" for r in shard.rejects))}
        hashes[file_label(rejects)] = publish_parquet(
            pa.Table.from_pylist(shard.rejects, schema=REJECT_SCHEMA), rejects, info)
        marker = self.markers.write(end.shard, {**info, "files": hashes})
        self.committed[end.shard] = marker
        if self.manifest is not None:
            self.manifest.record({end.shard: marker})

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
        tar_path = temp_path(self.out / "shards" / f"{name}.tar")
        return _OpenShard(tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT), tar_path)

    @staticmethod
    def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: reruns are byte-identical
        tar.addfile(info, io.BytesIO(data))
