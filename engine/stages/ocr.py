"""OCR stage: text lines of each image, read from its ``ocr`` view, into ``sample.ocr``.

PP-OCR reads one image per call, so throughput comes from reading several images at once:
``--ocr-workers`` sessions, each used by one thread at a time (a session's wrapper keeps
per-call state, so sessions are never shared between threads).
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

from engine.record import Sample
from engine.stage import ImageView, Resources, Stage, run_per_sample
from models.ocr import OcrConfig, OcrModel


class Ocr(Stage):
    name = "ocr"

    def __init__(self, config: OcrConfig):
        self.config = config
        self.model = OcrModel(config)  # checks model files now, before any work starts
        self._idle: queue.Queue[OcrModel] = queue.Queue()
        self._pool: ThreadPoolExecutor | None = None

    def views(self) -> tuple[ImageView, ...]:
        return (ImageView("ocr", self.config.ocr_max_side),)

    def resources(self) -> Resources:
        return Resources(batch_size=max(8, 2 * self.config.ocr_workers), device="cpu")

    def setup(self) -> None:
        self.model.load()
        self._idle.put(self.model)
        for _ in range(self.config.ocr_workers - 1):
            model = OcrModel(self.config)
            model.load()
            self._idle.put(model)
        if self.config.ocr_workers > 1:
            self._pool = ThreadPoolExecutor(self.config.ocr_workers, thread_name_prefix="ocr")

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self._pool is None:
            return run_per_sample(self.name, batch, self._read)
        list(self._pool.map(lambda sample: run_per_sample(self.name, [sample], self._read), batch))
        return batch

    def _read(self, sample: Sample) -> None:
        model = self._idle.get()
        try:
            sample.ocr = model.read(sample.views["ocr"])
        finally:
            self._idle.put(model)

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def describe(self) -> str:
        return f"{self.name} ({self.model.backend.describe}, onnxruntime cpu, {self.config.ocr_workers} sessions)"
