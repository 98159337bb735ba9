"""Pass 1's model stage: one EVA-CLIP embedding per image, float32, unit norm."""

from __future__ import annotations

from pathlib import Path

from engine.config import CurateConfig
from engine.record import Sample
from engine.stage import ImageView, Resources, Stage
from models.base import ModelRef

# EVA02 CLIP models take 224 px crops of the shorter side; a 448 px longer side keeps the
# shorter side >= 224 for aspect ratios up to 2:1 without decoding more pixels than needed.
EMBED_VIEW = ImageView("embed", 448)


def embed_model_path(cfg: CurateConfig, models: str, cache_dir: str) -> str:
    """The model name to load: the tiny folder (built once) when asked for tiny models."""
    if models == "tiny" or cfg.embed_model == "tiny":
        return ModelRef("tiny", "embed").resolve(Path(cache_dir))
    return cfg.embed_model


class Embed(Stage):
    name = "embed"

    def __init__(self, cfg: CurateConfig, *, model: str, device: str):
        self.cfg = cfg
        self.model_name = model
        self.device = device
        self.embedder = None

    def resources(self) -> Resources:
        return Resources(batch_size=self.cfg.embed_batch, device=self.device)

    def views(self) -> tuple[ImageView, ...]:
        return (EMBED_VIEW,)

    def setup(self) -> None:
        from models.embedder import ClipEmbedder

        self.embedder = ClipEmbedder(self.model_name, weights=self.cfg.embed_weights, device=self.device,
                                     image_onnx=self.cfg.embed_onnx)

    def process(self, batch: list[Sample]) -> list[Sample]:
        ready = [s for s in batch if EMBED_VIEW.name in s.views]
        for sample in batch:
            if EMBED_VIEW.name not in sample.views:
                sample.fail(self.name, "no decoded 'embed' view")
        try:
            vectors = self.embedder.embed_images([s.views[EMBED_VIEW.name] for s in ready])
        except Exception:  # noqa: BLE001 - find the bad image instead of losing the batch
            vectors = None
        if vectors is None:
            for sample in ready:
                self._embed_one(sample)
        else:
            for sample, vector in zip(ready, vectors):
                sample.embedding = vector
        for sample in ready:
            sample.views.pop(EMBED_VIEW.name, None)  # pass 1 keeps no pixels past this point
        return batch

    def _embed_one(self, sample: Sample) -> None:
        try:
            sample.embedding = self.embedder.embed_images([sample.views[EMBED_VIEW.name]])[0]
        except Exception as exc:  # noqa: BLE001 - per-sample failure is data
            sample.fail(self.name, f"{type(exc).__name__}: {exc}")

    def teardown(self) -> None:
        self.embedder = None

    def describe(self) -> str:
        return self.embedder.describe() if self.embedder else f"open_clip {self.model_name}"
