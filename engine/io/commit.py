"""Exactly-once publishing on shared storage: no-replace links (conditional creates on object
storage), then a per-shard done marker.

A shard's output files grow under temporary names unique to their writer (two writers of one
shard never share a temporary). Each is made final with :func:`publish`: fsync, ``os.link`` to
the final name, fsync of the folder. ``link`` never replaces: when the name exists
(``EEXIST``), another writer published that file first and its bytes stay. Only then is the
shard's done marker (``markers/<shard>.json``: counts, the SHA-256 of every published file,
attempt, node) published the same way. The marker is the source of truth for "this shard is
finished"; the manifest (engine/io/manifest.py) is derived from the markers by the one driver.

Why not ``os.replace``: a worker that froze (SIGSTOP, a stalled NFS client, a VM pause) while
its shard was redone elsewhere wakes up and finishes its commit. A rename would overwrite the
finished shard with a second version; a no-replace link cannot. A writer that is killed between
publishing its files and its marker leaves complete files behind; :meth:`ShardMarkers.complete`
writes the marker from them on the next run without redoing the shard.

On object storage (engine/io/object_output.py) the temporaries are local files and a publish is
an upload that creates the object only if its key is free (S3 ``If-None-Match: *``, GCS
``ifGenerationMatch=0``); a late writer's create fails with 412 and the first writer's bytes
stay, as with ``EEXIST``. The functions here take a local ``Path`` or an ``ObjectPath`` alike.

The per-shard facts that a marker must be rebuildable from (path, sample count, shard-level
errors, and whatever counts the reader adds to :class:`ShardEnd`) travel in the schema
metadata of the shard's last published parquet file (:data:`SHARD_INFO_KEY`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from engine.core.record import ShardEnd
from engine.io.manifest import fsync_dir
from engine.io.object_output import ObjectPath, OutPath, remove_dead_staging, staging_folder

TMP_SUFFIX = ".tmp"
MARKERS_DIR = "markers"
SHARD_INFO_KEY = b"densefusion.shard"  # parquet schema metadata: the shard's facts, as JSON


def node_name() -> str:
    return socket.gethostname()


def temp_path(final: OutPath) -> Path:
    """A temporary name beside ``final`` (in a local staging folder for an object), unique to
    this writer (host, process, random)."""
    folder = staging_folder(final.parent) if isinstance(final, ObjectPath) else final.parent
    return folder / f"{final.name}.{node_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


def remove_stale_temporaries(folder: OutPath) -> None:
    """Temporaries of a killed run; call only where no other writer can be live (a run's start).
    (For an object folder: the local ones of dead processes; live writers' stay.)"""
    if isinstance(folder, ObjectPath):
        remove_dead_staging(folder)
        return
    for stale in folder.glob(f"*{TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def file_label(path: OutPath) -> str:
    """How a marker names a published file: its folder and name (``shards/x.tar``)."""
    return f"{path.parent.name}/{path.name}"


def file_sha256(path: OutPath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def publish(tmp: Path, final: OutPath) -> str:
    """Make ``tmp`` final under ``final`` unless a file is already there; ``tmp`` is removed
    either way. Returns the SHA-256 of what ``final`` holds now (ours, or the first writer's)."""
    try:
        digest = file_sha256(tmp)
        if not _create(tmp, final):
            digest = file_sha256(final)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _create(tmp: Path, final: OutPath) -> bool:
    """The no-replace step: False when ``final`` was already there (another writer's stays)."""
    if isinstance(final, ObjectPath):
        return final.create_from(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    finally:
        fsync_dir(final.parent)


def publish_bytes(data: bytes, final: OutPath) -> str:
    if isinstance(final, ObjectPath):  # one request, no temporary
        return hashlib.sha256(data).hexdigest() if final.create(data) else file_sha256(final)
    tmp = temp_path(final)
    tmp.write_bytes(data)
    return publish(tmp, final)


def publish_parquet(table, final: OutPath, shard_info: dict[str, Any] | None = None) -> str:
    """Write ``table`` (with the shard's facts in its metadata when given) and publish it."""
    import pyarrow.parquet as pq

    if shard_info is not None:
        metadata = dict(table.schema.metadata or {})
        metadata[SHARD_INFO_KEY] = json.dumps(shard_info, ensure_ascii=False).encode()
        table = table.replace_schema_metadata(metadata)
    tmp = temp_path(final)
    pq.write_table(table, tmp)
    return publish(tmp, final)


def read_shard_info(path: OutPath) -> dict[str, Any]:
    import pyarrow.parquet as pq

    with path.open("rb") as handle:
        metadata = pq.read_schema(handle).metadata or {}
    return json.loads(metadata[SHARD_INFO_KEY]) if SHARD_INFO_KEY in metadata else {}


def shard_info(end: ShardEnd, attempt: int = 1, node: str = "") -> dict[str, Any]:
    """Every field of the shard's end marker except its name (generic: a field added to
    ``ShardEnd`` reaches the marker and the manifest without a change here), and who made it:
    which try of the shard this is, on which node."""
    info = {name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(end).items() if name != "shard"}
    info["samples"] = info.pop("n_samples")
    return {**info, "attempt": attempt, "node": node or node_name()}


def parquet_rows(path: OutPath) -> int:
    import pyarrow.parquet as pq

    with path.open("rb") as handle:
        return pq.read_metadata(handle).num_rows


def listed(folder: OutPath) -> set[str]:
    """The names in ``folder`` (one listing; empty when there is no such folder)."""
    if isinstance(folder, ObjectPath):
        return folder.names()
    try:
        return {entry.name for entry in os.scandir(folder)}
    except FileNotFoundError:
        return set()


def check_links(folder: Path) -> str | None:
    """Why ``folder`` cannot hold no-replace commits (no hard links, e.g. some object-store
    mounts), or None when it can."""
    probe = temp_path(folder / ".link-probe")
    linked = probe.with_name(probe.name + ".linked" + TMP_SUFFIX)
    try:
        probe.write_bytes(b"")
        os.link(probe, linked)
    except OSError as exc:
        return f"{folder} does not support hard links ({exc.strerror}); the exactly-once commit needs them"
    finally:
        probe.unlink(missing_ok=True)
        linked.unlink(missing_ok=True)
    return None


class ShardMarkers:
    """The folder of per-shard done markers (``<shard>.json``), each published no-replace."""

    def __init__(self, folder: OutPath):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, shard: str) -> OutPath:
        return self.folder / f"{shard}.json"

    def read(self, shard: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(shard).read_text())
        except FileNotFoundError:
            return None

    def names(self) -> set[str]:
        """The marked shards (a folder listing; no marker is read)."""
        return {name[:-5] for name in listed(self.folder) if name.endswith(".json")}

    def unrecorded(self, recorded: set[str], marked: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """The markers of the marked shards (``marked`` when the caller has listed them: a listing
        of 50,000 markers is 50 requests on object storage) not in ``recorded``, in name order."""
        return {shard: self.read(shard) for shard in sorted((self.names() if marked is None else marked) - recorded)}

    def write(self, shard: str, marker: dict[str, Any]) -> dict[str, Any]:
        """Publish ``marker`` unless the shard already has one; returns the one that stands."""
        marker = {**marker, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        publish_bytes(json.dumps(marker, indent=2, ensure_ascii=False).encode(), self.path(shard))
        return self.read(shard)

    def complete(self, shard: str, files: list[OutPath], info_file: OutPath,
                 counts: dict[str, int]) -> dict[str, Any] | None:
        """The marker of a shard whose files were all published by a writer that died before
        its marker: written from those files (nothing is redone). None when a file is missing."""
        if not all(path.exists() for path in files):
            return None
        return self.write(shard, {**read_shard_info(info_file), **counts,
                                  "files": {file_label(p): file_sha256(p) for p in files}, "completed_from_files": True})
