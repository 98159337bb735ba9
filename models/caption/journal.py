"""Captions already paid for, kept across restarts of a run (remote engines bill per request).

An append-only JSON-lines file: one line per finished caption, keyed by a digest of what was
asked (model, prompt, image pixels, sampling parameters). A killed run loses at most the
requests in flight; the rerun finds the rest here instead of asking the endpoint again.
A line cut short by a kill is ignored on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from pathlib import Path

import numpy as np

from models.caption.base import SamplingParams
from models.records import Caption


def request_digest(model: str, prompt: str, image: np.ndarray, params: SamplingParams) -> str:
    digest = hashlib.sha256()
    for part in (model, prompt, repr(image.shape), repr(dataclasses.astuple(params))):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


class CaptionJournal:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._known: dict[str, Caption] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self._known[entry["id"]] = Caption(**entry["caption"])
                except (ValueError, KeyError, TypeError):
                    continue  # the last line of a killed run
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run
        if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self._file.write("\n")  # end the cut line, so the next entry starts on its own

    def __len__(self) -> int:
        return len(self._known)

    def get(self, digest: str) -> Caption | None:
        return self._known.get(digest)

    def add(self, digest: str, caption: Caption) -> None:
        line = json.dumps({"id": digest, "caption": dataclasses.asdict(caption)}, ensure_ascii=False)
        with self._lock:
            self._known[digest] = caption
            self._file.write(line + "\n")
            self._file.flush()  # in the OS once written: survives a killed process

    def close(self) -> None:
        self._file.close()
