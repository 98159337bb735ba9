"""The embedding store of pass 1: float16 rows in a chunked zarr array plus a parquet index.

    curate/embeddings.parts/<shard>.npy  float16 rows of one shard, as its writer embedded them
    curate/index.parts/<shard>.parquet   one row per embedded sample (``row`` = row within the part)
    curate/rejects.parts/<shard>.parquet one row per sample pass 1 dropped (key, stage, reason)
    curate/markers/<shard>.json          the shard's done marker (engine/io/commit.py)
    curate/embeddings.zarr               every adopted shard's rows, in adoption order, chunked by rows
    curate/manifest.jsonl                adopted shards: their markers plus first row, a line each
    curate/index.parquet                 all parts, in row order (written by :meth:`consolidate`)

Whoever embeds a shard (this process, or one of many Ray workers on shared storage) publishes
its three parts and its marker with the no-replace commit of engine/io/commit.py, so a shard is
committed once however many workers tried it. The one driver then *adopts* each marked shard:
appends its rows to the zarr array at the committed row count and records the shard in the
manifest. The committed row count is the sum over the manifest, so rows written by an adoption
that was killed half-way are overwritten by the next one: no gaps and no duplicates. The parts
stay as the record of what was committed (embeddings cost ~1.5 KB an image, a shard's images far
more).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.record import Sample, ShardEnd
from engine.io.commit import (
    MARKERS_DIR,
    ShardMarkers,
    file_label,
    publish_bytes,
    publish_parquet,
    remove_stale_temporaries,
    shard_info,
)
from engine.io.manifest import Manifest, write_parquet_atomic

INDEX_COLUMNS = ("key", "shard", "path", "member", "offset", "size", "width", "height", "alt_text", "row")
DEFAULT_CHUNK_ROWS = 16384
PARTS = ("embeddings.parts", "index.parts", "rejects.parts")


class EmbeddingStore:
    """Writer side (``write`` / ``commit`` / ``close``) and driver side (``settle`` / ``adopt``):
    the driver's :class:`engine.core.sink.Sink`; and reader side of pass 1's output.
    ``adopt=False`` makes a worker's store: it publishes its shards' parts and markers and
    leaves the zarr array and the manifest to the driver."""

    def __init__(self, root: Path, dim: int | None = None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 adopt: bool = True):
        import zarr

        self.root = root
        self.zarr_path = root / "embeddings.zarr"
        self.manifest = Manifest(root)
        self._rows = sum(entry["rows"] for _, entry in self.manifest.entries())
        self.chunk_rows = chunk_rows
        self.adopting = adopt
        self.attempts: dict[str, int] = {}  # which try of a shard this is (a Ray worker sets it)
        self.node = ""  # recorded in markers (default: the host name; a Ray worker adds its node address)
        self.array = zarr.open_array(self.zarr_path, mode="r+") if self.zarr_path.exists() else None
        if dim is not None:
            self._ensure_array(dim)
        for folder in PARTS:
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.markers = ShardMarkers(root / MARKERS_DIR)
        self.committed: dict[str, dict[str, Any]] = {}  # shard → its marker, for this writer's commits
        self._pending: dict[str, list[Sample]] = {}
        self.written = 0  # embedded by this invocation
        self.rejected = 0

    def _ensure_array(self, dim: int) -> None:
        import zarr

        if self.array is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.array = zarr.create_array(
                self.zarr_path, shape=(0, dim), chunks=(self.chunk_rows, dim), dtype="float16",
                compressors=None,  # embeddings barely compress; raw chunks stream fastest
            )
        if self.array.shape[1] != dim:
            raise ValueError(f"{self.zarr_path} holds {self.array.shape[1]}-d embeddings, not {dim}-d")

    def files(self, shard: str) -> list[Path]:
        """A shard's parts in publishing order (the last one carries the shard's facts)."""
        return [self.root / folder / f"{shard}.{'npy' if folder.startswith('embeddings') else 'parquet'}"
                for folder in PARTS]

    # --- writing ---------------------------------------------------------------------

    @property
    def finished(self) -> set[str]:
        return self.manifest.finished

    @property
    def rows(self) -> int:
        """Rows committed so far (rows past this belong to a shard that never finished)."""
        return self._rows

    def write(self, sample: Sample) -> None:
        self._pending.setdefault(sample.source.shard, []).append(sample)

    def commit(self, end: ShardEnd) -> None:
        samples = self._pending.pop(end.shard, [])
        alive = [s for s in samples if s.alive and s.embedding is not None]
        dead = [s for s in samples if not (s.alive and s.embedding is not None)]
        vectors_path, index_path, rejects_path = self.files(end.shard)
        hashes = {}
        if alive:
            buffer = io.BytesIO()
            np.save(buffer, np.stack([s.embedding for s in alive]).astype(np.float16))
            hashes[file_label(vectors_path)] = publish_bytes(buffer.getvalue(), vectors_path)
        hashes[file_label(index_path)] = publish_parquet(_index_table(alive), index_path)
        info = {**shard_info(end, self.attempts.get(end.shard, 1), self.node),
                "samples": len(samples), "rows": len(alive),
                "written": len(alive), "rejected": len(dead),
                "rejected_by_stage": dict(Counter(_reject_stage(s) for s in dead))}
        hashes[file_label(rejects_path)] = publish_parquet(_rejects_table(dead), rejects_path, info)
        marker = self.markers.write(end.shard, {**info, "files": hashes})
        self.committed[end.shard] = marker
        if self.adopting:
            self.adopt({end.shard: marker})
        self.written += len(alive)
        self.rejected += len(dead)

    def close(self) -> None:
        """Uncommitted samples are dropped: their shard is redone on the next run."""
        self._pending.clear()

    # --- the driver's side -------------------------------------------------------------

    def remove_temporaries(self) -> None:
        """Parts of writers no longer alive (a killed run, copies stopped at the end of a Ray run)."""
        for folder in (*PARTS, MARKERS_DIR):
            remove_stale_temporaries(self.root / folder)

    def settle(self, shards: list[str]) -> None:
        """At a run's start: remove killed writers' temporaries, complete the marker of a shard
        whose parts were all published by a writer killed before its marker, and adopt every
        marked shard the manifest lacks."""
        import pyarrow.parquet as pq

        self.remove_temporaries()
        marked = self.markers.names()
        for shard in (shard for shard in shards if shard not in marked):
            vectors_path, index_path, rejects_path = self.files(shard)
            if not (index_path.exists() and rejects_path.exists()):
                continue
            rows = pq.read_metadata(index_path).num_rows
            files = ([vectors_path] if rows else []) + [index_path, rejects_path]
            self.markers.complete(shard, files, rejects_path,
                                  {"rows": rows, "rejected": pq.read_metadata(rejects_path).num_rows})
        self.adopt(self.markers.unrecorded(self.finished))

    def adopt(self, markers: dict[str, dict[str, Any]]) -> None:
        """Append marked shards' rows to the zarr array and record them in the manifest."""
        for shard, marker in markers.items():
            start = self.rows
            if marker["rows"]:
                vectors = np.load(self.files(shard)[0])
                self._ensure_array(vectors.shape[1])
                if self.array.shape[0] < start + len(vectors):
                    self.array.resize((start + len(vectors), self.array.shape[1]))
                self.array[start:start + len(vectors)] = vectors
            self.manifest.record({shard: {**marker, "start_row": start}})
            self._rows += marker["rows"]

    # --- reading ---------------------------------------------------------------------

    def consolidate(self):
        """All committed index parts as one table in row order, also written to index.parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        shards = sorted((entry["start_row"], name) for name, entry in self.manifest.entries())
        parts = []
        for start_row, name in shards:
            part = pq.read_table(self.files(name)[1])
            rows = pa.array(np.arange(start_row, start_row + part.num_rows, dtype=np.int64))
            parts.append(part.set_column(part.schema.get_field_index("row"), "row", rows))
        table = pa.concat_tables(parts) if parts else _index_table([])
        write_parquet_atomic(table, self.root / "index.parquet")
        return table

    def rejects(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = [pq.read_table(self.root / "rejects.parts" / f"{name}.parquet") for name in sorted(self.finished)]
        return pa.concat_tables(parts) if parts else _rejects_table([])

    def embeddings(self):
        """The committed rows as a (lazy) zarr view; read it in row chunks."""
        if self.array is None:
            raise ValueError(f"no embeddings in {self.root}: every sample was rejected")
        return CommittedRows(self.array, self.rows)


class CommittedRows:
    """Row-sliceable view of the first ``n`` rows of a zarr array (what k-means streams)."""

    def __init__(self, array, n: int):
        self.array, self.n = array, n
        self.chunk_rows = array.chunks[0]

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.array.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.n)
        return self.array[start:stop]


def _index_table(samples: list[Sample]):
    import pyarrow as pa

    return pa.table({
        "key": pa.array([s.key for s in samples], pa.string()),
        "shard": pa.array([s.source.shard for s in samples], pa.string()),
        "path": pa.array([s.source.path for s in samples], pa.string()),
        "member": pa.array([s.source.member for s in samples], pa.string()),
        "offset": pa.array([s.source.offset for s in samples], pa.int64()),
        "size": pa.array([s.source.size for s in samples], pa.int64()),
        "width": pa.array([s.width for s in samples], pa.int32()),
        "height": pa.array([s.height for s in samples], pa.int32()),
        "alt_text": pa.array([s.alt_text for s in samples], pa.string()),
        "row": pa.array(np.arange(len(samples), dtype=np.int64)),
    })


def _reject_stage(sample: Sample) -> str:
    return sample.stage or "embed"  # alive without an embedding: the embedder left it out


def _rejects_table(samples: list[Sample]):
    import pyarrow as pa

    from engine.io.writers import REJECT_SCHEMA

    return pa.Table.from_pylist([
        {"key": s.key, "shard": s.source.shard, "member": s.source.member,
         "stage": _reject_stage(s), "status": "error" if s.alive else s.status,
         "reason": s.reason or "no embedding"}
        for s in samples
    ], schema=REJECT_SCHEMA)
