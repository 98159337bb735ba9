"""The embedding store of pass 1: float16 rows in a chunked zarr array plus a parquet index.

    curate/embeddings.zarr        (N, D) float16, rows in commit order, chunked by rows
    curate/index.parts/<shard>.parquet   one row per embedded sample (``row`` = zarr row)
    curate/rejects.parts/<shard>.parquet one row per sample pass 1 dropped (key, stage, reason)
    curate/manifest.json          finished shards: first row, row count, counts
    curate/index.parquet          all parts, in row order (written by :meth:`consolidate`)

A shard is committed atomically: its zarr rows are written first (zarr's local store replaces
each chunk file atomically), then its index part (temporary name, fsync, rename), then the
manifest. The committed row count is the sum over the manifest, so rows of a shard killed
half-way are simply overwritten by the next shard: a rerun skips finished shards and redoes
the rest, with no gaps and no duplicates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.core.record import Sample, ShardEnd
from engine.io.manifest import Manifest, write_parquet_atomic

INDEX_COLUMNS = ("key", "shard", "path", "member", "offset", "size", "width", "height", "alt_text", "row")
DEFAULT_CHUNK_ROWS = 16384


class EmbeddingStore:
    """Writer side (``write`` / ``commit`` / ``close``) and reader side of pass 1's output."""

    def __init__(self, root: Path, dim: int | None = None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        import zarr

        self.root = root
        self.zarr_path = root / "embeddings.zarr"
        self.manifest = Manifest(root / "manifest.json")
        self.chunk_rows = chunk_rows
        self.array = zarr.open_array(self.zarr_path, mode="r+") if self.zarr_path.exists() else None
        if dim is not None:
            self._ensure_array(dim)
        (root / "index.parts").mkdir(parents=True, exist_ok=True)
        (root / "rejects.parts").mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, list[Sample]] = {}

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

    # --- writing ---------------------------------------------------------------------

    @property
    def finished(self) -> set[str]:
        return self.manifest.finished

    @property
    def rows(self) -> int:
        """Rows committed so far (rows past this belong to a shard that never finished)."""
        return sum(s["rows"] for s in self.manifest.data["shards"].values())

    def write(self, sample: Sample) -> None:
        self._pending.setdefault(sample.source.shard, []).append(sample)

    def commit(self, end: ShardEnd) -> None:
        samples = self._pending.pop(end.shard, [])
        alive = [s for s in samples if s.alive and s.embedding is not None]
        dead = [s for s in samples if not (s.alive and s.embedding is not None)]
        start = self.rows
        if alive:
            vectors = np.stack([s.embedding for s in alive]).astype(np.float16)
            self._ensure_array(vectors.shape[1])
            if self.array.shape[0] < start + len(alive):
                self.array.resize((start + len(alive), self.array.shape[1]))
            self.array[start:start + len(alive)] = vectors
        write_parquet_atomic(_index_table(alive, start), self.root / "index.parts" / f"{end.shard}.parquet")
        write_parquet_atomic(_rejects_table(dead), self.root / "rejects.parts" / f"{end.shard}.parquet")
        self.manifest.finish(end.shard, start_row=start, rows=len(alive), samples=len(samples),
                             rejected=len(dead), errors=list(end.errors))

    def close(self) -> None:
        """Uncommitted samples are dropped: their shard is redone on the next run."""
        self._pending.clear()

    # --- reading ---------------------------------------------------------------------

    def consolidate(self):
        """All committed index parts as one table in row order, also written to index.parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        shards = sorted(self.manifest.data["shards"].items(), key=lambda kv: kv[1]["start_row"])
        parts = [pq.read_table(self.root / "index.parts" / f"{name}.parquet") for name, _ in shards]
        table = pa.concat_tables(parts) if parts else _index_table([], 0)
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

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.n)
        return self.array[start:stop]


def _index_table(samples: list[Sample], start: int):
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
        "row": pa.array(np.arange(start, start + len(samples), dtype=np.int64)),
    })


def _rejects_table(samples: list[Sample]):
    import pyarrow as pa

    from engine.io.writers import REJECT_SCHEMA

    return pa.Table.from_pylist([
        {"key": s.key, "shard": s.source.shard, "member": s.source.member,
         "stage": s.stage or "embed", "status": "error" if s.alive else s.status,
         "reason": s.reason or "no embedding"}
        for s in samples
    ], schema=REJECT_SCHEMA)
