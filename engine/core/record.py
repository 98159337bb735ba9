"""The typed record that every stage fills in, one per input sample.

A sample is alive (``status == "ok"``) until a stage filters it or records an error on it;
from then on the runtime routes it straight to the writer, which puts it in ``rejects/``.
Failures are data: stages never raise for a bad sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from models.records import Box, Caption, OcrLine, Tag

Status = Literal["ok", "filtered", "error"]


@dataclass(frozen=True)
class Source:
    """Where the sample's bytes live, so a later pass can re-read one member directly."""

    shard: str  # output shard name (input file stem), also the rejects/ file name
    path: str  # input shard path (tar, parquet or folder)
    member: str  # tar member name, parquet row index, or file path relative to the folder
    offset: int = -1  # byte offset of the image data inside a tar (-1: not a tar)
    size: int = -1  # byte size of the image data inside a tar


@dataclass
class Sample:
    key: str
    source: Source
    image_bytes: bytes = b""
    image_ext: str = "jpg"
    alt_text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # source metadata (url, original size, ...)
    width: int = 0  # after EXIF orientation
    height: int = 0
    image_format: str = ""  # as the header says ("JPEG", "PNG", ...)
    image_mode: str = ""  # PIL mode from the header ("RGB", "CMYK", "P", ...)
    views: dict[str, np.ndarray] = field(default_factory=dict)  # decoded RGB uint8 HWC per consumer
    embedding: np.ndarray | None = None
    tags: list[Tag] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    ocr: list[OcrLine] = field(default_factory=list)
    # the plugins' evidence kinds (engine/core/registry.py), by name: plain JSON values; the
    # paper's kinds are the fields above
    evidence: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    caption: Caption | None = None
    scores: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # quality-control verdicts that did not drop
    status: Status = "ok"
    stage: str = ""  # the stage that filtered or failed the sample
    reason: str = ""

    @property
    def alive(self) -> bool:
        return self.status == "ok"

    def filter(self, stage: str, reason: str) -> None:
        self._end("filtered", stage, reason)

    def fail(self, stage: str, reason: str) -> None:
        self._end("error", stage, reason)

    def _end(self, status: Status, stage: str, reason: str) -> None:
        self.status, self.stage, self.reason = status, stage, reason
        # pixels and image bytes are the bulk of a sample's memory; a dead sample's row in
        # rejects/ needs neither (a shard of rejected 127 MiB members once stayed in memory whole)
        self.views.clear()
        self.image_bytes = b""

    def get(self, kind: str) -> Any:
        """An evidence kind's value: the paper's kinds are fields, a plugin's in ``evidence``."""
        return getattr(self, kind) if kind in _FIELDS else self.evidence.get(kind)

    def put(self, kind: str, value: Any) -> None:
        if kind in _FIELDS:
            setattr(self, kind, value)
        else:
            self.evidence[kind] = value

    def annotations(self) -> dict[str, Any]:
        """Everything the engine learnt about the sample: the ``<key>.json`` of the output."""
        return {
            "key": self.key,
            "shard": self.source.shard,
            "width": self.width,
            "height": self.height,
            "image_format": self.image_format,
            "alt_text": self.alt_text,
            "meta": self.meta,
            "tags": [asdict(t) for t in self.tags],
            "boxes": [asdict(b) for b in self.boxes],
            "ocr": [asdict(o) for o in self.ocr],
            "prompt": self.prompt,
            "caption": self.caption.text if self.caption else "",
            "engine": _engine(self.caption),
            "scores": self.scores,
            "flags": self.flags,
            **self.evidence,  # a plugin's kinds, only when it ran
        }


def _engine(caption: Caption | None) -> dict[str, Any]:
    if caption is None:
        return {}
    return {
        "model": caption.model,
        "backend": caption.backend,
        "prompt_tokens": caption.prompt_tokens,
        "output_tokens": caption.output_tokens,
        "finish_reason": caption.finish_reason,
        "seconds": round(caption.seconds, 4),
    }


_FIELDS = frozenset(Sample.__dataclass_fields__)


@dataclass(frozen=True)
class ShardEnd:
    """Marker that follows a shard's last sample through every queue; the writer commits on it."""

    shard: str
    path: str
    n_samples: int  # keys read: each one is written or rejected
    errors: tuple[str, ...] = ()  # shard-level problems (e.g. a truncated tar), kept in the manifest
    skipped: tuple[tuple[int, int], ...] = ()  # byte ranges [start, end) of a damaged archive that held no usable header
    # member data passed over by its size field, not kept (members over the cap or of no use, extended
    # headers over theirs, a .txt past its kept start)
    unread_bytes: int = 0
