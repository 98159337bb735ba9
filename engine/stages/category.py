"""Image category (engine/category.py) from the CLIP embedding, into ``sample.scores``.

Uses ``sample.embedding`` when pass 1 left one on the sample; otherwise embeds the decoded
view with the same model, so the category is there whether or not pass 1 ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from engine.category import as_scores, category_probabilities, category_prototypes
from engine.record import Sample
from engine.stage import ImageView, Resources, Stage

# Same name and size as pass 1's embedding view, so one decode serves both when they share a run.
CATEGORY_VIEW = ImageView("embed", 448)


class ImageTextEmbedder(Protocol):
    """What models/embedder.py's ClipEmbedder offers: unit-norm embeddings in one space."""

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


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
        return (CATEGORY_VIEW,)

    def setup(self) -> None:
        self.embedder = self.make_embedder()
        self.prototypes = category_prototypes(self.embedder)

    def process(self, batch: list[Sample]) -> list[Sample]:
        missing = [s for s in batch if s.embedding is None]
        if missing:
            self._embed(missing)
        ready = [s for s in batch if s.alive and s.embedding is not None]
        if ready:
            probabilities = category_probabilities(np.stack([s.embedding for s in ready]), self.prototypes)
            for sample, p in zip(ready, probabilities):
                sample.scores.update(as_scores(p))
        for sample in batch:
            sample.views.pop(CATEGORY_VIEW.name, None)
        return batch

    def _embed(self, samples: list[Sample]) -> None:
        for sample in samples:
            if CATEGORY_VIEW.name not in sample.views:
                sample.fail(self.name, f"no decoded '{CATEGORY_VIEW.name}' view and no embedding")
        ready = [s for s in samples if s.alive]
        try:
            vectors = self.embedder.embed_images([s.views[CATEGORY_VIEW.name] for s in ready])
        except Exception:  # noqa: BLE001 - one bad image must not cost the batch: go one by one
            vectors = None
        for i, sample in enumerate(ready):
            try:
                sample.embedding = (vectors[i] if vectors is not None
                                    else self.embedder.embed_images([sample.views[CATEGORY_VIEW.name]])[0])
            except Exception as exc:  # noqa: BLE001 - per-sample failure is data
                sample.fail(self.name, f"{type(exc).__name__}: {exc}")

    def teardown(self) -> None:
        self.embedder = self.prototypes = None

    def describe(self) -> str:
        describe = getattr(self.embedder, "describe", None)
        return f"category (zero-shot, {describe() if describe else 'CLIP'})"
