"""Caption stage: each sample's fusion prompt and image → the caption engine, in batches."""

from __future__ import annotations

from pathlib import Path

from engine.config import RuntimeConfig
from engine.record import Sample
from engine.stage import ImageView, Resources, Stage
from models.base import TINY, ModelRef
from models.caption.base import CaptionEngine
from models.caption.registry import CaptionConfig, load_engine


class CaptionStage(Stage):
    name = "caption"

    def __init__(self, config: CaptionConfig, runtime: RuntimeConfig):
        self.config = config
        self.device = runtime.device  # already resolved from "auto" by the pipeline
        self.cache_dir = Path(runtime.cache_dir)
        self.ref = ModelRef(TINY if runtime.models == TINY else config.caption_model, "caption")
        self.ref.check()
        self.engine: CaptionEngine | None = None

    def views(self) -> tuple[ImageView, ...]:
        return (ImageView("caption", self.config.caption_max_side),)

    def resources(self) -> Resources:
        return Resources(batch_size=self.config.caption_batch, device=self.device)

    def setup(self) -> None:
        path = self.ref.resolve(self.cache_dir)
        self.engine = load_engine(self.config, self.ref.name, path, self.device)

    def process(self, batch: list[Sample]) -> list[Sample]:
        ready = []
        for sample in batch:
            if not sample.prompt:
                sample.fail(self.name, "no fusion prompt: run the prompt stage before caption")
            elif "caption" not in sample.views:
                sample.fail(self.name, "no decoded 'caption' view")
            else:
                ready.append(sample)
        if not ready:
            return batch
        captions = self.engine.generate(
            [s.prompt for s in ready],
            [s.views["caption"] for s in ready],
            params=self.config.sampling(),
        )
        for sample, caption in zip(ready, captions, strict=True):
            if caption.finish_reason == "error":
                sample.fail(self.name, caption.text)
            else:
                sample.caption = caption
        return batch

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def describe(self) -> str:
        backend = self.engine.backend if self.engine else self.config.caption_backend
        return f"{self.name} ({self.ref.name}, {backend}, {self.device})"
