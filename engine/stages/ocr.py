"""OCR stage: text lines of each image, read from its ``ocr`` view, into ``sample.ocr``.

The whole batch goes to the model at once (the ``batched`` backend detects several images per
call and recognises the text crops of the batch together). Throughput on the CPU also comes from
reading several batches at once: the runtime keeps ``--ocr-workers`` batches in ``process()``,
and each takes one of as many sessions (a session is never used by two threads at a time).
"""

from __future__ import annotations

import dataclasses
import queue

from engine.core.config import OcrConfig, RunConfig
from engine.core.placement import Need
from engine.core.record import Sample
from engine.core.stage import ImageView, Resources, Stage, run_per_sample
from models.ocr import OcrModel, OcrSettings, model_files


def build(cfg: RunConfig) -> Ocr:
    return Ocr(cfg.ocr, cfg.runtime.device)


def ocr_settings(config: OcrConfig) -> OcrSettings:
    """The options an OCR session reads, taken from the config section by name."""
    return OcrSettings(**{f.name: getattr(config, f.name) for f in dataclasses.fields(OcrSettings)})


class Ocr(Stage):
    name = "ocr"

    def __init__(self, config: OcrConfig, device: str = "cpu"):
        self.config = config
        self.device = device
        # on a GPU (one replica per GPU) two sessions suffice: one batch's CPU pre/post-processing
        # overlaps the other's kernels; on the CPU every session is a core's worth of work
        self.sessions = config.ocr_workers if device == "cpu" else min(2, config.ocr_workers)
        self.settings = ocr_settings(config)
        self.model = OcrModel(self.settings, device)  # checks model files now, before any work starts
        self._idle: queue.Queue[OcrModel] = queue.Queue()

    def views(self) -> tuple[ImageView, ...]:
        return (ImageView("ocr", self.config.ocr_max_side),)

    def resources(self) -> Resources:
        # Batches of 8, not single images: a stage after OCR flushes a partial batch when its
        # input pauses, and one image at a time would leave the caption engine batches of one.
        return Resources(batch_size=8, device=self.device, workers=self.sessions)

    def setup(self) -> None:
        self.model.load()
        self._idle.put(self.model)
        for _ in range(self.sessions - 1):
            model = OcrModel(self.settings, self.device)
            model.load()
            self._idle.put(model)

    def process(self, batch: list[Sample]) -> list[Sample]:
        readable = [s for s in batch if "ocr" in s.views]
        for sample in batch:
            if "ocr" not in sample.views:
                sample.fail(self.name, "no decoded 'ocr' view")
        model = self._idle.get()
        try:
            try:
                for sample, lines in zip(readable, model.read([s.views["ocr"] for s in readable]), strict=True):
                    sample.ocr = lines
            except Exception:  # noqa: BLE001 - find the image that broke the batch: one at a time
                run_per_sample(self.name, readable, lambda s: setattr(s, "ocr", model.read([s.views["ocr"]])[0]))
        finally:
            self._idle.put(model)
        return batch

    def describe(self) -> str:
        provider = getattr(self.model.backend, "provider", "CPUExecutionProvider")
        sessions = f"{self.sessions} session{'s' if self.sessions > 1 else ''}"
        runtime = f"onnxruntime {provider.removesuffix('ExecutionProvider')}"
        return f"{self.name} ({self.model.backend.describe}, {runtime}, {sessions})"


def ocr_need(cfg: RunConfig) -> tuple[Need, ...]:
    """The OCR's memory per replica: its ONNX files, and an estimate of detection's activations."""
    size = sum(path.stat().st_size for path in model_files(ocr_settings(cfg.ocr)))
    side, batch = cfg.ocr.ocr_det_side, cfg.ocr.ocr_det_batch or 8
    # estimate: DB's largest maps are 64 channels at stride 4... over the padded batch, float32
    activations = batch * 4 * 64 * side * side * 3 // 4 // 16
    return (Need("ocr", "PP-OCR det + rec (ONNX Runtime)", size // 4, size, activations, "ONNX file size",
                 "--stages without ocr"),)
