"""The typed values that model backends return and the engine carries on its samples: tags,
boxes, OCR lines, captions. Here, not in the engine, so that ``models/`` never imports the engine
(the engine imports ``models/``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tag:
    name: str
    score: float


@dataclass(frozen=True)
class Box:
    """A detection; ``xyxy`` is normalised to [0, 1] of the original image's width/height."""

    label: str
    score: float
    xyxy: tuple[float, float, float, float]
    source: str  # which detector produced it ("owlv2", "closed", "fused", ...)


@dataclass(frozen=True)
class OcrLine:
    """One recognised text line; ``xyxy`` normalised like :class:`Box`."""

    text: str
    score: float
    xyxy: tuple[float, float, float, float]


@dataclass(frozen=True)
class Caption:
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # "stop" | "length" | "error"
    seconds: float
    model: str
    backend: str
