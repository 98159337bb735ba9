"""Expert outputs kept per image, so re-captioning never reruns the experts.

An entry is addressed by the SHA-256 of the image bytes and a fingerprint of everything
that shapes the expert's output: every option declared with ``affects=`` that output
(engine/core/config.py), and the fingerprints of the outputs it is computed from; another
caption engine or prompt template changes neither, so a second run over the same images
reads tags and boxes from here. The store is one SQLite file (WAL mode: the tag
and detect stages read and write it from their own threads, each with its own connection).

:class:`CachedExpert` wraps an expert stage: hits are filled in from the cache, only the
misses reach the wrapped stage (whose models are loaded on the first miss).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from engine.core.config import RunConfig, options_affecting
from engine.core.record import Sample
from engine.core.registry import evidence_kinds, producers


def inputs_of(output: str) -> tuple[str, ...]:
    """The evidence kinds ``output`` is computed from: what its producers read or use (boxes come
    from OWLv2 queried with the image's tags)."""
    kinds = evidence_kinds()
    return tuple(dict.fromkeys(name for spec in producers(output) for name in spec.inputs() if name in kinds))


def image_digest(sample: Sample) -> str:
    return hashlib.sha256(sample.image_bytes).hexdigest()


def fingerprint(*parts: Any) -> str:
    """Stable digest of config dataclasses / strings describing an expert."""
    def plain(part):
        return dataclasses.asdict(part) if dataclasses.is_dataclass(part) else part

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def output_fingerprint(cfg: RunConfig, output: str) -> str:
    """What keys ``output`` (an evidence kind): the options declared to affect it, the files on
    disk those options name (:func:`files_on_disk`), and the fingerprints of the outputs it is
    computed from."""
    options = options_affecting(cfg, output)
    upstream = [output_fingerprint(cfg, name) for name in inputs_of(output)]
    on_disk = {name: files_on_disk(value) for name, value in options.items() if isinstance(value, str)}
    on_disk = {name: files for name, files in on_disk.items() if files}
    # Options naming nothing on disk (hub ids, 'tiny', numbers) keep the keys they always had.
    return fingerprint(output, options, upstream, *([on_disk] if on_disk else []))


COMPANION_SUFFIXES = (".txt", ".json")  # a tag list or label map read from beside a checkpoint


def files_on_disk(value: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of the files an option value names: every file of a folder; a
    file and the .txt/.json files beside it. New weights at the same path change the key;
    hashing gigabytes of weights on every run would not pay. [] when it names nothing."""
    path = Path(value).expanduser() if value else None
    if path is None or not path.exists():
        return []
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.is_file()]
    else:
        files = [path] + [f for f in path.parent.iterdir()
                          if f != path and f.is_file() and f.suffix in COMPANION_SUFFIXES]
    return sorted((str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files)


# Switching a new file to WAL while another connection opens it can fail at once with
# "database is locked" (SQLite skips the busy timeout there; about 1 in 100 when the tag and
# detect stages set up together). Openings in this process take turns; another process's
# opening is waited out by retrying.
_OPENING = threading.Lock()
_OPEN_RETRY_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ExpertCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        for wait in (*_OPEN_RETRY_S, None):
            try:
                with _OPENING:
                    self._initialise()
                return
            except sqlite3.OperationalError as exc:
                if wait is None or "locked" not in str(exc):
                    self.db.close()
                    raise
                time.sleep(wait)

    def _initialise(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS experts (image TEXT, expert TEXT, payload TEXT, PRIMARY KEY (image, expert))"
        )
        self.db.commit()

    def get_many(self, images: list[str], expert: str) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for start in range(0, len(images), 500):  # SQLite's bound-parameter limit
            chunk = images[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT image, payload FROM experts WHERE expert = ? AND image IN ({marks})", [expert, *chunk]
            )
            found.update((image, json.loads(payload)) for image, payload in rows)
        return found

    def put_many(self, entries: dict[str, dict], expert: str) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO experts VALUES (?, ?, ?)",
            [(image, expert, json.dumps(payload)) for image, payload in entries.items()],
        )
        self.db.commit()

    def close(self) -> None:
        self.db.close()
