"""OCR stage: text lines of each image, read from its ``ocr`` view, into ``sample.ocr``."""

from __future__ import annotations

from engine.record import Sample
from engine.stage import ImageView, Resources, Stage, run_per_sample
from models.ocr import OcrConfig, OcrModel


class Ocr(Stage):
    name = "ocr"

    def __init__(self, config: OcrConfig):
        self.config = config
        self.model = OcrModel(config)  # checks model files now, before any work starts

    def views(self) -> tuple[ImageView, ...]:
        return (ImageView("ocr", self.config.ocr_max_side),)

    def resources(self) -> Resources:
        # rapidocr reads one image per call (its text lines are batched inside)
        return Resources(batch_size=8, device="cpu")

    def setup(self) -> None:
        self.model.load()

    def process(self, batch: list[Sample]) -> list[Sample]:
        def read(sample: Sample) -> None:
            sample.ocr = self.model.read(sample.views["ocr"])

        return run_per_sample(self.name, batch, read)

    def describe(self) -> str:
        return f"{self.name} ({self.model.backend.describe}, onnxruntime cpu)"
