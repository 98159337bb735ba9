"""Image category (engine/evidence/category.py) from the CLIP embedding, into ``sample.scores``.

Uses ``sample.embedding`` when pass 1 left one on the sample; otherwise embeds the decoded
view with the same model, so the category is there whether or not pass 1 ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from engine.core.config import RunConfig
from engine.core.placement import Need
from engine.core.record import Sample
from engine.core.stage import ImageView, Resources, Stage
from engine.evidence.category import as_scores, category_probabilities, category_prototypes
from engine.stages.embed import EMBED_VIEW, embedder_factory, embedder_need, fill_embeddings


class ImageTextEmbedder(Protocol):
    """What models/embedder.py's ClipEmbedder offers: unit-norm embeddings in one space."""

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def build(cfg: RunConfig) -> Categorize:
    # pass 1's embedder: the embedding it leaves on the sample is the CLIP tagger's input too
    return Categorize(embedder_factory(cfg), batch_size=cfg.curate.embed_batch, device=cfg.runtime.device)


def category_need(cfg: RunConfig) -> tuple[Need, ...]:
    return (embedder_need(cfg.curate.embed_model, cfg.curate.embed_batch),)


class Categorize(Stage):
    name = "category"

    def __init__(self, make_embedder: Callable[[], ImageTextEmbedder], *, batch_size: int = 32,
                 device: str = "cpu"):
        self.make_embedder = make_embedder
        self.batch_size, self.device = batch_size, device
        self.embedder: ImageTextEmbedder | None = None
        self.prototypes: np.ndarray | None = None

    def resources(self) -> Resources:
        return Resources(batch_size=self.batch_size, device=self.device)

    def views(self) -> tuple[ImageView, ...]:
        return (EMBED_VIEW,)

    def setup(self) -> None:
        self.embedder = self.make_embedder()
        self.prototypes = category_prototypes(self.embedder)

    def process(self, batch: list[Sample]) -> list[Sample]:
        fill_embeddings(self.embedder, batch, self.name)
        ready = [s for s in batch if s.alive and s.embedding is not None]
        if ready:
            probabilities = category_probabilities(np.stack([s.embedding for s in ready]), self.prototypes)
            for sample, p in zip(ready, probabilities):
                sample.scores.update(as_scores(p))
        for sample in batch:
            sample.views.pop(EMBED_VIEW.name, None)
        return batch

    def teardown(self) -> None:
        self.embedder = self.prototypes = None

    def describe(self) -> str:
        describe = getattr(self.embedder, "describe", None)
        return f"category (zero-shot, {describe() if describe else 'CLIP'})"
