"""An output on object storage (``--out s3://bucket/prefix``, ``gs://bucket/prefix``): the same
layout as a local output folder, committed without rename or link.

An object store has no rename and no link, but it can create an object only if its key is free:
S3 when PutObject or CompleteMultipartUpload carries ``If-None-Match: *``, GCS when the upload
carries ``ifGenerationMatch=0``; a second create of the key fails with 412 PreconditionFailed and
the first object stays. fsspec's ``mode="create"`` sends whichever its store takes (s3fs, gcsfs)
and turns the 412 into ``FileExistsError``. That is engine/io/commit.py's no-replace publish:
a shard's files are written to local temporaries (:func:`staging_folder`), each uploaded with a
conditional create, then the done marker is created the same way. A frozen or late writer's
creates fail and change nothing. Creates are atomic (an object is whole or absent) and S3 and GCS
list what was created at once (strong read-after-write and list-after-write consistency), so a
marker listing is the truth as it is on a local disk. A store that does not refuse a second
create is refused before any work (:func:`check_conditional_create`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from engine.io.remote import filesystem, is_url
from models.errors import ConfigError

OUTPUT_PROTOCOLS = ("s3", "s3a", "gs", "gcs")
_TIMEOUT_S = 120.0  # a request that waits this long for the store fails instead of hanging a commit
_STAGING = "densefusion-staging"  # under the system's temporary folder ($TMPDIR)
_TEMPORARY = re.compile(r"-(\d+)-[0-9a-f]{8}\.tmp$")  # <name>.<host>-<pid>-<8 hex>.tmp (commit.temp_path)


@dataclass(frozen=True)
class ObjectPath:
    """A file or folder of an output on object storage: what the writers ask of a local ``Path``
    (``/``, ``name``, ``parent``, ``exists``, ``read_bytes``, ``open``...), and the conditional
    create that replaces the no-replace link."""

    url: str

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.url.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.url.rstrip("/").rsplit("/", 1)[0])

    def __str__(self) -> str:
        return self.url

    def _fs(self) -> tuple[Any, str]:
        # no listings cache: a marker listing must show what other writers created since
        return filesystem(self.url, _TIMEOUT_S, "--out", use_listings_cache=False)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object is under it."""

    def exists(self) -> bool:
        fs, path = self._fs()
        return fs.exists(path)

    def names(self) -> set[str]:
        """The names in this folder (one listing: a request per 1,000 names)."""
        fs, path = self._fs()
        try:
            return {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
        except FileNotFoundError:
            return set()

    def read_bytes(self) -> bytes:
        fs, path = self._fs()
        return fs.cat_file(path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb") -> IO[bytes]:
        fs, path = self._fs()
        return fs.open(path, mode)

    def write_bytes(self, data: bytes) -> None:
        """Replace the object whole (atomic: readers see the old or the new one); only for what
        one process writes (the driver's metrics.json and manifest segment), never shard files."""
        fs, path = self._fs()
        fs.pipe_file(path, data)

    def create(self, data: bytes) -> bool:
        """Create the object unless its key is taken; False when another writer created it first."""
        fs, path = self._fs()
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def create_from(self, local: Path) -> bool:
        """:meth:`create` from a local file (a multipart upload above s3fs's part size; the
        condition is on its completion, so a second writer's parts are discarded)."""
        fs, path = self._fs()
        try:
            fs.put_file(str(local), path, mode="create")
        except FileExistsError:
            return False
        return True

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self._fs()
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise


OutPath = Path | ObjectPath


def read_objects(paths: list[ObjectPath]) -> list[bytes]:
    """The objects' bytes, in order, fetched concurrently (one store and folder: a manifest's segments)."""
    if not paths:
        return []
    fs, _ = paths[0]._fs()
    keys = [path._fs()[1] for path in paths]
    fetched = fs.cat(keys)
    return [fetched[key] for key in keys]


def output_root(out: str, folder: str = "") -> OutPath:
    """Where a pass writes: ``folder`` under ``--out``, a local folder (created) or a prefix on
    object storage."""
    if is_url(out):
        root = ObjectPath(out.rstrip("/"))
        return root / folder if folder else root
    root = Path(out) / folder
    root.mkdir(parents=True, exist_ok=True)
    return root


def output_folder(value: str) -> Path:
    """The OUT argument of the tools that read an output folder (stats, report, export, status):
    an output on object storage is copied down first. Checked as typed, before a ``Path`` folds
    the URL's ``//``."""
    if is_url(value):
        copy = "gcloud storage rsync -r" if value.startswith(("gs:", "gcs:")) else "aws s3 sync"
        raise ConfigError(f"{value} is on object storage and this command reads an output folder: copy it down "
                          f"first ({copy} {value} DIR), then pass DIR")
    return Path(value)


def local_companion(out: str, cache_dir: str) -> Path:
    """Where a run keeps a local file of its output (the caption API's journal): the output
    folder, or for an output on object storage a folder under ``cache_dir`` named after it."""
    if not is_url(out):
        return Path(out)
    digest = hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]
    return Path(cache_dir) / "object-outputs" / f"{ObjectPath(out.rstrip('/')).name}-{digest}"


def staging_folder(folder: ObjectPath, *, make: bool = True) -> Path:
    """The local folder of the temporaries of objects being written into ``folder`` (one per
    output folder, so a run's start finds its killed predecessors' temporaries)."""
    digest = hashlib.sha256(folder.url.encode()).hexdigest()[:16]
    staging = Path(tempfile.gettempdir()) / _STAGING / f"{folder.name}-{digest}"
    if make:
        staging.mkdir(parents=True, exist_ok=True)
    return staging


def remove_dead_staging(folder: ObjectPath) -> None:
    """The local temporaries for ``folder`` of writers on this machine that are no longer alive
    (the store itself holds no temporary; an unfinished multipart upload is aborted by its
    writer, or by a bucket lifecycle rule when the writer was killed: see README)."""
    staging = staging_folder(folder, make=False)
    for entry in staging.iterdir() if staging.is_dir() else ():
        found = _TEMPORARY.search(entry.name)
        if found and not _alive(int(found.group(1))):
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def check_conditional_create(root: ObjectPath) -> str | None:
    """Why ``root`` cannot hold exactly-once commits (cannot be written, or does not refuse a
    second create of a key), or None when it can. Leaves nothing behind when delete is allowed."""
    probe = root / f".commit-probe-{uuid.uuid4().hex}"
    try:
        if not probe.create(b""):
            return f"{probe} existed before it was created"
        if probe.create(b"again"):
            return ("the store does not refuse a second create of one key (S3: If-None-Match: *, GCS: "
                    "ifGenerationMatch=0), so a late writer could replace a finished shard")
    except ConfigError:
        raise
    except TypeError as exc:  # a filesystem without mode="create"
        return f"its fsspec filesystem has no conditional create ({exc}); upgrade s3fs / gcsfs"
    except Exception as exc:  # noqa: BLE001 - each store raises its own (botocore, aiohttp, google) errors
        return (f"the store cannot be written ({type(exc).__name__}: {str(exc)[:300]}); check the bucket, the "
                f"credentials (S3: AWS_* variables, ~/.aws) and the endpoint (AWS_ENDPOINT_URL)")
    finally:
        try:
            probe.unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 - a store that allows no delete keeps a 0-byte probe; harmless
            pass
    return None

