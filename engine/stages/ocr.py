"""OCR stage: text lines of each image, read from its ``ocr`` view, into ``sample.ocr``.

PP-OCR reads one image per call, so throughput comes from reading several images at once:
the runtime keeps ``--ocr-workers`` batches in ``process()`` at once, and each image takes one
of as many sessions (a session's wrapper keeps per-call state, so a session is never used by
two threads at a time).
"""

from __future__ import annotations

import queue

from engine.core.record import Sample
from engine.core.stage import ImageView, Resources, Stage, run_per_sample
from models.ocr import OcrConfig, OcrModel


class Ocr(Stage):
    name = "ocr"

    def __init__(self, config: OcrConfig):
        self.config = config
        self.model = OcrModel(config)  # checks model files now, before any work starts
        self._idle: queue.Queue[OcrModel] = queue.Queue()

    def views(self) -> tuple[ImageView, ...]:
        return (ImageView("ocr", self.config.ocr_max_side),)

    def resources(self) -> Resources:
        # Batches of 8, not single images: a stage after OCR flushes a partial batch when its
        # input pauses, and one image at a time would leave the caption engine batches of one.
        return Resources(batch_size=8, device="cpu", workers=self.config.ocr_workers)

    def setup(self) -> None:
        self.model.load()
        self._idle.put(self.model)
        for _ in range(self.config.ocr_workers - 1):
            model = OcrModel(self.config)
            model.load()
            self._idle.put(model)

    def process(self, batch: list[Sample]) -> list[Sample]:
        return run_per_sample(self.name, batch, self._read)

    def _read(self, sample: Sample) -> None:
        model = self._idle.get()
        try:
            sample.ocr = model.read(sample.views["ocr"])
        finally:
            self._idle.put(model)

    def describe(self) -> str:
        return f"{self.name} ({self.model.backend.describe}, onnxruntime cpu, {self.config.ocr_workers} sessions)"
