"""Shards on object storage (``s3://``, ``gs://``, ``http(s)://``, ``hf://``: any URL fsspec has a
filesystem for), read in place: never copied to a local disk.

A URL shard is a :class:`RemoteShard`; it answers the few questions the readers ask of a local
``Path`` (``name``, ``is_dir``, ``str``), so its output shard name is its basename, as a local
file's is. Reading goes through :class:`ResumingReader`: ranged reads through fsspec, and after a
dropped connection, a stall or a short body, the file is opened again at the byte already
consumed (never from the start), a bounded number of times in a row; then the read raises an
``OSError`` that ends the shard with an error, as a damaged local file does.
"""

from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from models.errors import ConfigError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
BLOCK_BYTES = 8 << 20  # one ranged request: few requests per shard, one block of memory per open shard
_FIRST_BACKOFF_S = 0.2  # doubled after each failed attempt in a row


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


@dataclass(frozen=True)
class RemoteShard:
    """A shard at a URL. The same questions as a local ``Path`` answers, and the URL as its text."""

    url: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.url.split("?", 1)[0].rstrip("/")).name

    def is_dir(self) -> bool:
        return False  # a prefix of objects is no shard: list them with a glob instead

    def __str__(self) -> str:
        return self.url


Shard = Path | RemoteShard


def as_shard(text: str) -> Shard:
    """A shard from its text (as a Ray lease carries it): a URL, else a local path."""
    return RemoteShard(text) if is_url(text) else Path(text)


def filesystem(url: str, timeout_s: float = 60.0, flag: str = "--shards", **options: Any) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path in it; a read that waits ``timeout_s`` for data
    fails (and is retried) instead of hanging the run. Credentials and endpoints come from the
    store's usual configuration (for S3: ``AWS_*`` variables, ``~/.aws``, ``AWS_ENDPOINT_URL``).
    ``options`` go to the filesystem (an output's: no listings cache)."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                                                     sock_read=timeout_s)}
    elif protocol in ("s3", "s3a"):
        options["config_kwargs"] = {"connect_timeout": timeout_s, "read_timeout": timeout_s}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{flag} {url}: no filesystem for {protocol}:// ({exc}); "
                          f"install densefusion[cloud] (s3fs) or the fsspec package for that store") from exc


# A store's settings (endpoint, region, profile, credentials) as a driver's environment holds them:
# the Ray actors get them too, so they read and write the store the driver checked.
STORE_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                     "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                     "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "STORAGE_EMULATOR_HOST")


def store_environment() -> dict[str, str]:
    """The store settings of :data:`STORE_ENVIRONMENT` that are set here."""
    return {name: os.environ[name] for name in STORE_ENVIRONMENT if name in os.environ}


class UrlExpander:
    """Expands the URLs of one ``--shards`` list. A glob lists the store (S3, GCS, hf://; a plain
    HTTP host cannot list). A plain URL is looked up in one listing of its folder where the store
    lists (one request per folder and 1,000 names, not one per shard: a brace range of 50,000
    shards), else by a HEAD request of its own."""

    def __init__(self) -> None:
        self._listings: dict[str, set[str]] = {}  # folder URL → the paths in it

    def expand(self, pattern: str) -> tuple[list[RemoteShard], bool]:
        """The shards one (brace-expanded) URL names, and whether it matched. A store that cannot
        be read (no credentials, no endpoint, host down) stops the run here, before any work."""
        try:
            return self._expand(pattern)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - each store raises its own (aiohttp, botocore) errors
            raise ConfigError(f"--shards {pattern}: the store cannot be read ({type(exc).__name__}: {str(exc)[:300]}); "
                              f"check the address, the credentials (S3: AWS_* variables, ~/.aws) and the "
                              f"endpoint (AWS_ENDPOINT_URL)") from exc

    def _expand(self, pattern: str) -> tuple[list[RemoteShard], bool]:
        fs, path = filesystem(pattern)
        http = pattern.split("://", 1)[0].lower() in ("http", "https")
        if glob.has_magic(path):
            if http:
                raise ConfigError(f"--shards {pattern}: an HTTP host cannot be listed, so a glob cannot expand; "
                                  f"name the shards with a brace range ({{00000..00009}}) instead")
            matches = sorted(fs.glob(path))
            return [RemoteShard(fs.unstrip_protocol(m)) for m in matches], bool(matches)
        found = self._exists_http(fs, path) if http else path in self._listing(fs, pattern.rsplit("/", 1)[0])
        return [RemoteShard(pattern)] if found else [], found

    def _listing(self, fs: Any, folder: str) -> set[str]:
        if folder not in self._listings:
            try:
                self._listings[folder] = set(fs.ls(folder, detail=False))
            except (FileNotFoundError, NotADirectoryError):
                self._listings[folder] = set()
        return self._listings[folder]

    @staticmethod
    def _exists_http(fs: Any, path: str) -> bool:
        try:
            return fs.info(path).get("type") == "file"
        except FileNotFoundError:
            return False


class ResumingReader:
    """A binary file over a URL that survives dropped connections: each failure re-opens the object
    at the current offset (a ranged read) after a backoff, up to ``retries`` failures in a row
    without a byte of progress; then ``read`` raises ``OSError`` with the last failure."""

    def __init__(self, url: str, *, retries: int, timeout_s: float):
        self.url, self.retries = url, retries
        self.fs, self._path = filesystem(url, timeout_s)
        self.pos = 0
        self.reopened = 0  # re-opens after a failure, over the whole read
        self._file: Any = None

    def read(self, n: int = -1) -> bytes:
        failures = 0
        while True:
            try:
                if self._file is None:
                    self._file = self.fs.open(self._path, "rb", block_size=BLOCK_BYTES, cache_type="readahead")
                    self._file.seek(self.pos)
                data = self._file.read(n)
                self.pos += len(data)
                return data
            except Exception as exc:  # noqa: BLE001 - each store raises its own (aiohttp, botocore, fsspec) errors
                self._drop()
                failures += 1
                if failures > self.retries:
                    raise OSError(f"{self.url}: reading at byte {self.pos} failed {failures} times in a row; "
                                  f"last: {type(exc).__name__}: {str(exc)[:300]}") from exc
                self.reopened += 1
                time.sleep(_FIRST_BACKOFF_S * 2 ** (failures - 1))

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence:  # from here (1) or from the end (2: parquet's footer)
            offset += self.pos if whence == 1 else self.size()
        if offset != self.pos and self._file is not None:
            try:
                self._file.seek(offset)
            except Exception:  # noqa: BLE001 - the next read re-opens at the offset
                self._drop()
        self.pos = offset
        return offset

    def size(self) -> int:
        return self.fs.size(self._path)

    closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def _drop(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass

    def close(self) -> None:
        self._drop()
        self.closed = True

    def __enter__(self) -> ResumingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_binary(shard: Shard, *, retries: int = 5, timeout_s: float = 60.0) -> BinaryIO | ResumingReader:
    """A shard's bytes for reading: a local file, or a :class:`ResumingReader` over its URL."""
    if isinstance(shard, RemoteShard):
        return ResumingReader(shard.url, retries=retries, timeout_s=timeout_s)
    return open(shard, "rb")
