"""Detection stage: OWLv2 queried with the image's tags + a closed-set detector, fused.

Each detector reads its own view; raw boxes above each detector's threshold go through
``engine.evidence.boxes.fuse_boxes`` (merge across detectors, small-first balanced sampling, cap)
into ``sample.boxes``. Either detector may be off.
"""

from __future__ import annotations

from pathlib import Path

from engine.core.config import ExpertsConfig, FusionConfig, RunConfig
from engine.core.models import resolve_model
from engine.core.record import Sample
from engine.core.stage import ImageView, Resources, Stage, run_per_sample
from engine.evidence.boxes import fuse_boxes
from engine.stages.expert_cache import cached
from models.errors import Problems
from models.records import Box

OWLV2_VIEW = "owlv2"
CLOSED_VIEW = "closed"


def build(cfg: RunConfig) -> Stage:
    """OWLv2 and the closed-set detector the config names (either may be off), behind the
    expert cache; each detector's view is decoded at the input size its model files give."""
    from models import detector, owlv2

    experts, cache_dir = cfg.experts, Path(cfg.runtime.cache_dir)
    problems = Problems()
    open_ref = closed_ref = None
    with problems.check():
        open_ref = resolve_model("owlv2", experts.owlv2_model, cfg.runtime)
    with problems.check():
        closed_ref = resolve_model("detector", experts.closed_detector, cfg.runtime)
    problems.raise_found()
    open_model = open_ref.resolve(cache_dir) if open_ref else ""
    closed_model = closed_ref.resolve(cache_dir) if closed_ref else ""
    stage = Detect(experts, cfg.boxes, owlv2_model=open_model, closed_model=closed_model, device=cfg.runtime.device,
                   owlv2_side=owlv2.input_side(open_model) if open_model else 0,
                   closed_side=detector.input_side(closed_model, experts.closed_input_size) if closed_model else 0)
    return cached(stage, cfg, "boxes")


class Detect(Stage):
    name = "detect"

    def __init__(self, cfg: ExpertsConfig, fusion: FusionConfig, *, owlv2_model: str, closed_model: str,
                 device: str, owlv2_side: int = 960, closed_side: int = 1333):
        self.cfg = cfg
        self.fusion = fusion
        self.owlv2_model = owlv2_model
        self.closed_model = closed_model
        self.device = device
        self.owlv2_side = owlv2_side
        self.closed_side = closed_side
        self.owlv2 = None
        self.closed = None

    def resources(self) -> Resources:
        return Resources(batch_size=self.cfg.detect_batch, device=self.device)

    def views(self) -> tuple[ImageView, ...]:
        views = []
        if self.owlv2_model:
            views.append(ImageView(OWLV2_VIEW, self.owlv2_side))
        if self.closed_model:
            views.append(ImageView(CLOSED_VIEW, self.closed_side))
        return tuple(views)

    def setup(self) -> None:
        if self.owlv2_model:
            from models.owlv2 import Owlv2Detector

            self.owlv2 = Owlv2Detector(
                self.owlv2_model, device=self.device, preprocess=self.cfg.owlv2_preprocess,
                query_template=self.cfg.owlv2_query_template, nms_iou=self.cfg.owlv2_nms_iou,
            )
        if self.closed_model:
            from models.detector import load_detector

            self.closed = load_detector(self.closed_model, device=self.device, label_map=self.cfg.closed_label_map,
                                        input_size=self.cfg.closed_input_size)

    def process(self, batch: list[Sample]) -> list[Sample]:
        try:
            open_boxes = self._open(batch)
            closed_boxes = self._closed(batch)
        except Exception:  # noqa: BLE001 - one bad image must not cost the batch: redo one by one
            return run_per_sample(self.name, batch, lambda s: self._fuse(s, self._open([s])[0], self._closed([s])[0]))
        for sample, ob, cb in zip(batch, open_boxes, closed_boxes):
            self._fuse(sample, ob, cb)
        return batch

    def _open(self, batch: list[Sample]) -> list[list[Box]]:
        if self.owlv2 is None:
            return [[] for _ in batch]
        queries = [[t.name for t in s.tags] for s in batch]
        return self.owlv2.detect([s.views[OWLV2_VIEW] for s in batch], queries, min_score=self.fusion.open_min_score)

    def _closed(self, batch: list[Sample]) -> list[list[Box]]:
        if self.closed is None:
            return [[] for _ in batch]
        return self.closed.detect([s.views[CLOSED_VIEW] for s in batch], min_score=self.fusion.closed_min_score)

    def _fuse(self, sample: Sample, open_boxes: list[Box], closed_boxes: list[Box]) -> None:
        sample.boxes = fuse_boxes(open_boxes, closed_boxes, self.fusion, width=sample.width, height=sample.height)
        sample.views.pop(OWLV2_VIEW, None)
        sample.views.pop(CLOSED_VIEW, None)

    def teardown(self) -> None:
        self.owlv2 = self.closed = None

    def describe(self) -> str:
        parts = [f"owlv2 {self.owlv2_model} ({self.cfg.owlv2_preprocess})" if self.owlv2_model else "",
                 f"closed {self.closed_model}" if self.closed_model else ""]
        return "detect: " + (" + ".join(p for p in parts if p) or "off") + f" ({self.device})"
