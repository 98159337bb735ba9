"""Detection stage: OWLv2 queried with the image's tags + a closed-set detector, fused.

Each detector reads its own view; raw boxes above each detector's threshold go through
``engine.evidence.boxes.fuse_boxes`` (merge across detectors, small-first balanced sampling, cap)
into ``sample.boxes``. Either detector may be off.
"""

from __future__ import annotations

from pathlib import Path

from engine.core.config import ExpertsConfig, FusionConfig, RunConfig
from engine.core.models import resolve_model
from engine.core.placement import Need, count_params, vit_activations
from engine.core.record import Sample
from engine.core.stage import ImageView, Resources, Stage, run_per_sample
from engine.evidence.boxes import fuse_boxes
from engine.stages.expert_cache import cached
from models.errors import ConfigError, Problems
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


def detect_need(cfg: RunConfig) -> tuple[Need, ...]:
    """Each detector's memory per replica (either may be off)."""
    experts = cfg.experts
    found = [owlv2_need(experts.owlv2_model, experts.detect_batch)] if experts.owlv2_model else []
    if experts.closed_detector:
        found.append(closed_detector_need(experts.closed_detector, experts.detect_batch))
    return tuple(found)


def owlv2_need(model: str, batch: int) -> Need:
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    config, source = _hf_config(model, Owlv2Config, KNOWN_OWLV2)
    with torch.device("meta"):
        net = Owlv2ForObjectDetection(config)
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return Need("detect", f"OWLv2 {Path(model).name} ({vision.image_size} px)", count_params(net), 2 * count_params(net),
                vit_activations(batch, tokens, vision.hidden_size), source, "--owlv2-model ''")


def closed_detector_need(model: str, batch: int) -> Need:
    path = Path(model)
    if model.endswith(".onnx"):
        if path.is_file():
            params = path.stat().st_size // 4  # float32 export
            source = "ONNX file size; float16 on TensorRT"
        else:  # the paper's EVA02-L detector: a ViT-L backbone at 1024 px with a detection head
            params, source = 400_000_000, "assumed: ViT-L detector, 0.4B parameters (file not found here)"
        return Need("detect", f"closed-set {path.name}", params, 2 * params,
                    vit_activations(batch, 64 * 64, 1024, 16, 14 * 14), source, "--closed-detector ''")
    import torch
    from transformers import AutoConfig, AutoModelForObjectDetection

    if not (path / "config.json").is_file():
        raise ConfigError(f"plan: --closed-detector {model}: a local folder with config.json or an .onnx file")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        net = AutoModelForObjectDetection.from_config(config)
    return Need("detect", f"closed-set {path.name}", count_params(net), 2 * count_params(net),
                batch * 2 * 1333 * 800 * 256 // 16,  # estimate: stride-4 feature maps, 256 channels
                "config.json", "--closed-detector ''")


KNOWN_OWLV2 = {  # hub ids the plan knows without a download: their config.json's sizes
    "google/owlv2-base-patch16-ensemble": {"vision_config": {"image_size": 960}},
    "google/owlv2-base-patch16": {"vision_config": {"image_size": 960}},
    "google/owlv2-large-patch14-ensemble": {
        "projection_dim": 768,
        "vision_config": {"image_size": 1008, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16},
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
    },
}


def _hf_config(model: str, config_class, known: dict):
    """A transformers config: the folder's config.json, else a hub id this module knows."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return config_class.from_pretrained(path), "config.json"
    if model in known:
        overrides = known[model]
        base = config_class()
        data = base.to_dict()
        for key, value in overrides.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        return config_class.from_dict(data), f"known config of {model}"
    raise ConfigError(f"plan: {model} is neither a local folder with config.json nor a model the plan knows "
                      f"({', '.join(known)}): pass a local folder")
