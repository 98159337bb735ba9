"""The caption-engine interface every backend implements (transformers, SGLang, OpenAI-compatible)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from models.records import Caption


class EngineDead(RuntimeError):
    """The caption engine itself failed (its processes died): no request can succeed any more.
    Raised from ``generate``; the caption stage stops the run (finished shards stay committed)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 400  # the paper's captions average ~190 words (~250 tokens)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    min_new_tokens: int = 0  # benchmarks force a fixed output length with min = max


class CaptionEngine(Protocol):
    model: str  # what was loaded (folder, hub id or "tiny")
    backend: str  # "transformers", "sglang", "openai"
    device: str

    def generate(
        self, prompts: list[str], images: list[np.ndarray], /, *, params: SamplingParams
    ) -> list[Caption]:
        """One Caption per prompt, same order; a failed request is a Caption with
        ``finish_reason="error"`` and the message as text, never an exception."""
        ...

    def close(self) -> None: ...
