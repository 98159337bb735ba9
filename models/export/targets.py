"""The exportable vision experts: each loads through the same code the engine runs, then wraps
the part worth compiling (the image network) as a module taking one (B, 3, S, S) tensor."""

from __future__ import annotations

import json
from collections.abc import Callable

from models.errors import ConfigError
from models.export.onnx import ExportTarget


def embed_target(model: str, weights: str = "") -> ExportTarget:
    """EVA-CLIP image tower: normalised pixels → image features (L2-normalise after)."""
    import torch

    from models.embedder import ClipEmbedder

    embedder = ClipEmbedder(model, weights=weights, device="cpu", fp16=False)
    pre = embedder.preprocess
    example = torch.zeros(2, 3, pre.size, pre.size)
    return ExportTarget("embed", embedder.model.visual.eval(), example, "pixels", ("features",),
                        {"size": pre.size, "mean": list(pre.mean), "std": list(pre.std),
                         "resize": "shortest side, centre crop", "then": "L2-normalise the features"})


def ram_plus_target(model: str, weights: str = "") -> ExportTarget:
    """RAM++: normalised 384 px pixels → per-class tag probabilities (thresholds applied after)."""
    import torch

    from models.ram_plus import load_ram_plus

    ram = load_ram_plus(model)
    size = ram.cfg.image_size
    return ExportTarget("ram_plus", ram, torch.zeros(2, 3, size, size), "pixels", ("probs",),
                        {"size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                         "resize": "square", "then": "compare with the per-class thresholds"},
                        ram.side_files())  # the engine's tagger reads them beside the export


class _DetectionHead:
    """Wraps a transformers detector into the ONNX detector contract of ``models/detector.py``:
    float32 0–255 letterboxed (B, 3, S, S) in; ``boxes`` (xyxy pixels of the input), ``scores``,
    ``labels`` out. Normalisation and box decoding live in the graph."""

    def __new__(cls, detector, size: int, mean, std):
        import torch

        class Head(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.detector = detector
                self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
                self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

            def forward(self, pixels):
                out = self.detector(pixel_values=(pixels - self.mean) / self.std)
                probs = out.logits.softmax(-1)[..., :-1]  # the last class is DETR-style "no object"
                scores, labels = probs.max(-1)
                cx, cy, w, h = out.pred_boxes.unbind(-1)
                boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0, 1) * size
                return boxes, scores, labels

        return Head().eval()


def detector_target(model: str, weights: str = "") -> ExportTarget:
    """A transformers object detector (DETR family) → the engine's ONNX detector format."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    detector = AutoModelForObjectDetection.from_pretrained(model).eval()
    processor = AutoImageProcessor.from_pretrained(model)
    size = int(weights or max(getattr(detector.config, "image_size", [800]) or [800]))
    head = _DetectionHead(detector, size, processor.image_mean, processor.image_std)
    labels = {str(k): v for k, v in detector.config.id2label.items()}
    return ExportTarget("detector", head, torch.zeros(2, 3, size, size), "pixels", ("boxes", "scores", "labels"),
                        {"size": size, "pixels": "0-255 RGB, longer side to size, padded bottom/right"},
                        (("labels.json", json.dumps(labels)),))  # the ONNX detector reads it beside the .onnx


TARGETS: dict[str, Callable[[str, str], ExportTarget]] = {
    "embed": embed_target,
    "ram_plus": ram_plus_target,
    "detector": detector_target,
}


def build_target(name: str, model: str, weights: str = "") -> ExportTarget:
    if name not in TARGETS:
        raise ConfigError(f"unknown export target {name!r}; targets: {', '.join(TARGETS)}")
    return TARGETS[name](model, weights)
