"""Tagging stage: ``sample.tags`` from RAM++ (its own 384 px view) or CLIP zero-shot.

The CLIP tagger reads the pass-1 embedding (``sample.embedding``); only a sample that
arrives without one is embedded here, from the ``embed`` view the embedder uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.core.config import ExpertsConfig
from engine.core.record import Sample
from engine.core.stage import ImageView, Resources, Stage
from engine.stages.embed import EMBED_VIEW, fill_embeddings

RAM_VIEW = ImageView("ram_plus", 384)


class RamPlusTag(Stage):
    name = "tag"

    def __init__(self, cfg: ExpertsConfig, *, model: str, device: str):
        self.cfg = cfg
        self.model_name = model
        self.device = device
        self.model = None

    def resources(self) -> Resources:
        return Resources(batch_size=self.cfg.tag_batch, device=self.device)

    def views(self) -> tuple[ImageView, ...]:
        return (RAM_VIEW,)

    def setup(self) -> None:
        from models.ram_plus import load_tagger

        self.model = load_tagger(self.model_name, self.device)  # a checkpoint (torch) or an .onnx export

    def process(self, batch: list[Sample]) -> list[Sample]:
        images = [s.views.pop(RAM_VIEW.name) for s in batch]
        for sample, tags in zip(batch, self.model.tag(images), strict=True):
            sample.tags = tags[: self.cfg.max_tags]
        return batch

    def teardown(self) -> None:
        self.model = None

    def describe(self) -> str:
        runtime = f"onnxruntime {self.model.provider}" if hasattr(self.model, "provider") else self.device
        return f"tag: RAM++ {self.model_name} ({runtime})"


class ClipTag(Stage):
    """``embedder_factory()`` gives an object with ``embed_texts`` (and ``embed_images`` for
    samples without a pass-1 embedding), e.g. ``models.embedder.ClipEmbedder``."""

    name = "tag"

    def __init__(self, cfg: ExpertsConfig, *, vocabulary: list[str], embedder_factory: Callable[[], object],
                 cache_dir: str, device: str):
        self.cfg = cfg
        self.vocabulary = vocabulary
        self.embedder_factory = embedder_factory
        self.cache_dir = cache_dir
        self.device = device
        self.embedder = None
        self.tagger = None

    def resources(self) -> Resources:
        return Resources(batch_size=self.cfg.tag_batch, device=self.device)

    def views(self) -> tuple[ImageView, ...]:
        return (EMBED_VIEW,)

    def setup(self) -> None:
        from pathlib import Path

        from models.clip_tagger import ClipZeroShotTagger

        self.embedder = self.embedder_factory()
        self.tagger = ClipZeroShotTagger(
            self.embedder, self.vocabulary, template=self.cfg.clip_tag_template,
            threshold=self.cfg.clip_tag_threshold, top_k=self.cfg.clip_tag_top_k, cache_dir=Path(self.cache_dir),
        )

    def process(self, batch: list[Sample]) -> list[Sample]:
        fill_embeddings(self.embedder, batch, self.name)
        for sample in batch:
            sample.views.pop(EMBED_VIEW.name, None)
        ready = [s for s in batch if s.alive]
        if ready:
            vectors = np.stack([np.asarray(s.embedding, np.float32) for s in ready])
            for sample, tags in zip(ready, self.tagger.tag(vectors)):
                sample.tags = tags[: self.cfg.max_tags]
        return batch

    def teardown(self) -> None:
        self.embedder = self.tagger = None

    def describe(self) -> str:
        return f"tag: CLIP zero-shot over {len(self.vocabulary)} tags ({self.device})"
