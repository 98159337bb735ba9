"""Closed-set detection behind one interface, two backends.

* ``transformers``: any ``AutoModelForObjectDetection`` checkpoint (DETR, Deformable DETR,
  RT-DETR, YOLOS, ...) with its own image processor and ``post_process_object_detection``.
* ``onnx``: an exported detector (the paper's EVA02 LVIS/COCO model is a detectron2 model,
  which gets here through an ONNX export) run by ONNX Runtime. Contract of the file:
  one float32 input ``(B, 3, S, S)``, RGB, 0–255 (detectron2 normalises inside the
  graph), the image resized so its longer side is ``S`` and padded bottom/right; outputs
  ``boxes`` ``(B, N, 4)`` xyxy in input pixels, ``scores`` ``(B, N)``, ``labels`` ``(B, N)``
  integer class ids; a label-map file beside it (``labels.json`` ``{"0": "person", ...}``
  or ``labels.txt``, one name a line) names the classes. ``S`` is read from the
  graph's input shape, or given when the graph has a dynamic size.

Both return boxes normalised to [0, 1] of the original image, scores ≥ ``min_score``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from models.errors import ConfigError
from models.geometry import normalise_pixels
from models.onnx_session import open_session
from models.preprocess import to_device
from models.records import Box

SOURCE = "closed"


class ClosedSetDetector(Protocol):
    def detect(self, images: Sequence[np.ndarray], *, min_score: float) -> list[list[Box]]:
        ...

    def describe(self) -> str:
        ...


class TransformersDetector:
    def __init__(self, model: str, *, device: str = "cpu", fp16: bool | None = None):
        import torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.device = device
        self.dtype = torch.float16 if (device.startswith("cuda") if fp16 is None else fp16) else torch.float32
        self.model = AutoModelForObjectDetection.from_pretrained(model, dtype=self.dtype).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.id2label = self.model.config.id2label
        self.name = model

    def detect(self, images: Sequence[np.ndarray], *, min_score: float = 0.0) -> list[list[Box]]:
        import torch

        if not images:
            return []
        # the processor wraps arrays with torch.from_numpy, which wants writable memory
        images = [img if img.flags.writeable else img.copy() for img in images]
        inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: to_device(v, self.device, self.dtype if v.is_floating_point() else None)
                  for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [img.shape[:2] for img in images]
        results = self.processor.post_process_object_detection(outputs, threshold=min_score, target_sizes=sizes)
        out = []
        for (h, w), result in zip(sizes, results):
            out.append([
                Box(str(self.id2label.get(int(label), label)), round(float(score), 4),
                    normalise_pixels(box.float().tolist(), w, h), SOURCE)
                for box, score, label in zip(result["boxes"].cpu(), result["scores"].cpu(), result["labels"].cpu())
            ])
        return out

    def describe(self) -> str:
        return f"closed-set transformers {self.name} ({self.device})"


class OnnxDetector:
    def __init__(self, path: str, *, label_map: str = "", input_size: int = 0, device: str = "cpu"):
        self.session = open_session(path, device, flag="--closed-detector")
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        shape = graph_input.shape
        static = [d for d in shape[2:] if isinstance(d, int)]
        self.size = input_size or (static[0] if len(static) == 2 and static[0] == static[1] else 0)
        if not self.size:
            raise ConfigError(f"{path}: the input size is dynamic; give it with --closed-input-size")
        from models.preprocess import Letterbox

        self.letterbox = Letterbox(self.size, "cpu")  # 0–255, no normalisation: the graph's own
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else 0
        outputs = {o.name for o in self.session.get_outputs()}
        if not {"boxes", "scores", "labels"} <= outputs:
            raise ConfigError(f"{path}: an ONNX detector must output boxes, scores, labels (has {sorted(outputs)})")
        self.labels = read_label_map(Path(label_map) if label_map else _label_map_beside(Path(path)))
        self.name = path
        self.providers = self.session.get_providers()

    def detect(self, images: Sequence[np.ndarray], *, min_score: float = 0.0) -> list[list[Box]]:
        if not images:
            return []
        step = self.fixed_batch or len(images)
        out: list[list[Box]] = []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            batch, scales = self._inputs(chunk)
            boxes, scores, labels = self.session.run(["boxes", "scores", "labels"], {self.input_name: batch})
            for img, scale, b, s, lab in zip(chunk, scales, boxes, scores, labels):
                h, w = img.shape[:2]
                keep = s >= min_score
                out.append([
                    Box(self.labels.get(int(k), str(int(k))), round(float(sc), 4),
                        normalise_pixels([v / scale for v in box], w, h), SOURCE)
                    for box, sc, k in zip(b[keep], s[keep], lab[keep])
                ])
        return out

    def _inputs(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[float]]:
        """Longer side → ``size``, padded bottom/right, float32 0–255 NCHW (the file's contract)."""
        batch, scales = self.letterbox(images)
        return batch.numpy(), scales

    def describe(self) -> str:
        return f"closed-set onnx {self.name} ({self.providers[0]})"


def _label_map_beside(path: Path) -> Path:
    for name in ("labels.json", "labels.txt", path.stem + ".labels.json", path.stem + ".labels.txt"):
        if (path.parent / name).exists():
            return path.parent / name
    raise ConfigError(f"no label map for {path}: put labels.json or labels.txt beside it, or pass --closed-label-map")


def read_label_map(path: Path) -> dict[int, str]:
    if not path.exists():
        raise ConfigError(f"label map {path} does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return dict(enumerate(map(str, data)))
        return {int(k): str(v) for k, v in data.items()}
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return {i: name for i, name in enumerate(lines) if name}


def load_detector(model: str, *, device: str = "cpu", label_map: str = "", input_size: int = 0) -> ClosedSetDetector:
    """An ``.onnx`` file → ONNX Runtime; anything else → a transformers checkpoint."""
    if model.endswith(".onnx"):
        return OnnxDetector(model, label_map=label_map, input_size=input_size, device=device)
    return TransformersDetector(model, device=device)


def input_side(model: str, input_size: int = 0) -> int:
    """The longest side the detector reads: ``input_size`` when given (an ONNX graph with a
    dynamic input), else its processor's longest edge (DETR: 1333); the engine decodes the
    detector's view at this size."""
    if input_size:
        return input_size
    processor = Path(model) / "preprocessor_config.json"
    if not model.endswith(".onnx") and processor.is_file():
        size = json.loads(processor.read_text()).get("size", {})
        return int(size.get("longest_edge") or max(size.get("height", 0), size.get("width", 0)) or 1333)
    return 1333


TINY_DETECTOR_LABELS = {0: "dog", 1: "cat", 2: "car"}


def build_tiny(folder: Path) -> Path:
    """A random-weight YOLOS (no backbone download) saved as a transformers checkpoint."""
    import torch
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(0)
    config = YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=[64, 64], patch_size=16, num_detection_tokens=5,
                         id2label=TINY_DETECTOR_LABELS, label2id={v: k for k, v in TINY_DETECTOR_LABELS.items()})
    YolosForObjectDetection(config).eval().save_pretrained(folder)
    YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return Path(folder)
