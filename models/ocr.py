"""OCR expert: PP-OCR text detection + recognition, lines in reading order.

Backends:
- ``batched`` (default): the PP-OCR detection/recognition ONNX models that the ``rapidocr``
  wheel ships (or ``--ocr-model-dir``'s ``*det*.onnx`` / ``*rec*.onnx``), run by ONNX Runtime
  on the run's device (TensorRT, CUDA or the CPU: ``models/onnx_session.py``) with our own
  batching: detection over ``--ocr-det-batch`` images per call (padded to one shape), and
  recognition over the text crops of the whole batch of images, sorted by aspect so a call
  pads little. Detection reads the image at ``--ocr-det-side`` (longer side, 736); ``rapidocr``
  upscales the shorter side to 736 instead: 2-3.5x the pixels of a 4:3 to 2:1 view, for the
  same lines on the project's OCR tests. Detection is ~80% of rapidocr's time per image, so
  that is where the per-core gain comes from (``python -m bench experts`` prints both
  backends); batching pays on a GPU, where one call of many images fills the device.
  rapidocr's own post-processing (DB boxes, CTC decoding, crops) is reused as is.
- ``rapidocr``: the ``rapidocr`` pipeline itself, one image per call; works offline.
- ``paddleocr``: PaddleOCR 3.x on local model folders (``--ocr-model-dir`` with ``det/`` and
  ``rec/`` inference-model folders). It never is the default: without local folders it tries
  to reach its model hosts and refuses to start offline.

Whatever the backend, the result is the same: :class:`OcrLine` per text box, its text in the
original language, its box normalised to [0, 1] of the image it was read from (the OCR view is
a uniform resize of the original, so that equals the original's normalised box), ordered top
to bottom and left to right, filtered by confidence and capped in lines and characters.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from models.errors import ConfigError
from models.geometry import normalise_pixels
from models.records import OcrLine


@dataclass(frozen=True)
class OcrSettings:
    """The OCR options a session reads, named as the engine's ``--ocr-*`` options (which
    explain each, engine/core/config.py), so the engine hands its values over by name."""

    ocr_backend: str  # a key of _BACKENDS
    ocr_model_dir: str
    ocr_min_score: float
    ocr_max_lines: int
    ocr_max_chars: int
    ocr_det_side: int
    ocr_det_batch: int
    ocr_rec_batch: int
    ocr_angle_cls: bool
    ocr_threads: int


@dataclass(frozen=True)
class RawText:
    """What a backend found before ordering and caps; ``xyxy`` in pixels."""

    text: str
    score: float
    xyxy: tuple[float, float, float, float]


class OcrBackend(Protocol):
    name: str
    describe: str

    def load(self) -> None: ...

    def detect_and_read(self, images: list[np.ndarray]) -> list[list[RawText]]: ...


class OcrModel:
    """One OCR session per worker: ``read(images)`` gives each image's ordered, filtered,
    capped lines. ``device``: where the ``batched`` backend runs ("cpu", "cuda[:N]")."""

    def __init__(self, config: OcrSettings, device: str = "cpu"):
        self.config = config
        self.backend: OcrBackend = _BACKENDS[config.ocr_backend](config, device)  # checks files only

    def load(self) -> None:
        """Start the inference session; once per worker, in the thread that will use it."""
        self.backend.load()

    def read(self, images: list[np.ndarray]) -> list[list[OcrLine]]:
        return [self._lines(image, found) for image, found in zip(images, self.backend.detect_and_read(images),
                                                                   strict=True)]

    def _lines(self, image: np.ndarray, found: list[RawText]) -> list[OcrLine]:
        height, width = image.shape[:2]
        found = [
            t
            for t in found
            # lines without a letter or digit are shapes read as bullets and dashes
            if t.score >= self.config.ocr_min_score and any(ch.isalnum() for ch in t.text)
        ]
        lines = []
        budget = self.config.ocr_max_chars
        for raw in reading_order(found)[: self.config.ocr_max_lines]:
            text = raw.text.strip()[:budget]
            xyxy = normalise_pixels(raw.xyxy, width, height)
            lines.append(OcrLine(text=text, score=round(float(raw.score), 4), xyxy=xyxy))
            budget -= len(text)
            if budget <= 0:
                break
        return lines


def reading_order(texts: list[RawText]) -> list[RawText]:
    """Top to bottom by rows, left to right inside a row.

    Boxes join a row when they overlap its vertical band by at least half the smaller height,
    so a slightly tilted or taller word stays on its line and two columns read row by row.
    """
    rows: list[list[RawText]] = []
    bands: list[tuple[float, float]] = []
    for text in sorted(texts, key=lambda t: (t.xyxy[1] + t.xyxy[3]) / 2):
        _, top, _, bottom = text.xyxy
        for i, (band_top, band_bottom) in enumerate(bands):
            overlap = min(bottom, band_bottom) - max(top, band_top)
            if overlap >= 0.5 * min(bottom - top, band_bottom - band_top):
                rows[i].append(text)
                bands[i] = (min(top, band_top), max(bottom, band_bottom))
                break
        else:
            rows.append([text])
            bands.append((top, bottom))
    order = sorted(range(len(rows)), key=lambda i: bands[i][0])
    return [t for i in order for t in sorted(rows[i], key=lambda t: t.xyxy[0])]


def _xyxy(quad) -> tuple[float, float, float, float]:
    points = np.asarray(quad, dtype=np.float32).reshape(-1, 2)
    return (*points.min(axis=0).tolist(), *points.max(axis=0).tolist())


def _one_onnx(folder: Path, task: str) -> Path:
    found = sorted(folder.glob(f"*{task}*.onnx"))
    if len(found) != 1:
        raise ConfigError(
            f"OCR: expected exactly one *{task}*.onnx in {folder}, found "
            f"{[p.name for p in found] or 'none'}: pass --ocr-model-dir with one det and one rec model"
        )
    return found[0]


def model_files(config: OcrSettings) -> list[Path]:
    """The detection and recognition ONNX files the settings name (their sizes give ``plan`` the
    OCR's memory)."""
    folder = _model_folder(config)
    return [_one_onnx(folder, task) for task in ("det", "rec")]


def _model_folder(config: OcrSettings) -> Path:
    """--ocr-model-dir, else the PP-OCR models inside the rapidocr wheel."""
    try:
        import rapidocr
    except ImportError:
        raise ConfigError(f"OCR backend {config.ocr_backend} needs rapidocr: pip install rapidocr") from None
    folder = Path(config.ocr_model_dir or Path(rapidocr.__file__).parent / "models")
    if not folder.is_dir():
        raise ConfigError(f"--ocr-model-dir {folder} is not a folder")
    return folder


class BatchedPpOcr:
    """PP-OCR's ONNX detection and recognition models, batched across images (module doc)."""

    name = "batched"
    det_thresh, box_thresh, unclip_ratio = 0.3, 0.5, 1.6  # rapidocr's (and PaddleOCR's) DB settings
    line_height, min_line_width = 48, 320  # the recognition input PP-OCR was trained with
    max_pad = 1.2  # a recognition call pads a line to at most this times its own width
    cls_width, cls_thresh = 192, 0.9

    def __init__(self, config: OcrSettings, device: str):
        folder = _model_folder(config)
        self.config, self.device = config, device
        self.det_batch = config.ocr_det_batch or (8 if device.startswith("cuda") else 1)
        self.paths = {task: _one_onnx(folder, task) for task in ("det", "rec", *(("cls",) if config.ocr_angle_cls else ()))}
        self.describe = f"PP-OCR {self.paths['rec'].stem}, batched"
        self.sessions: dict = {}

    def load(self) -> None:
        from rapidocr.ch_ppocr_cls.utils import ClsPostProcess
        from rapidocr.ch_ppocr_det.utils import DBPostProcess
        from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

        from models.onnx_session import open_session

        threads = self.config.ocr_threads
        self.sessions = {task: open_session(path, self.device, flag="--ocr-model-dir", threads=threads)
                         for task, path in self.paths.items()}
        self.provider = self.sessions["det"].get_providers()[0]
        meta = self.sessions["rec"].get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise ConfigError(f"OCR: {self.paths['rec']} carries no character list in its metadata "
                              f"(PP-OCR exports by rapidocr do): use --ocr-backend rapidocr")
        self.decode = CTCLabelDecode(character=meta["character"].splitlines())
        self.boxes = DBPostProcess(thresh=self.det_thresh, box_thresh=self.box_thresh,
                                   unclip_ratio=self.unclip_ratio, use_dilation=True)
        self.angle = ClsPostProcess(["0", "180"])

    def detect_and_read(self, images: list[np.ndarray]) -> list[list[RawText]]:
        from rapidocr.utils.process_img import get_rotate_crop_image

        bgr = [np.ascontiguousarray(image[:, :, ::-1]) for image in images]  # PP-OCR was trained on BGR
        quads = self._detect(bgr)
        crops, owners = [], []
        for i, (image, found) in enumerate(zip(bgr, quads)):
            for quad in found:
                crops.append(get_rotate_crop_image(image, quad.astype(np.float32)))
                owners.append((i, quad))
        if self.config.ocr_angle_cls:
            crops = self._turn_upside_down(crops)
        texts: list[list[RawText]] = [[] for _ in images]
        for (i, quad), (text, score) in zip(owners, self._recognise(crops), strict=True):
            if text.strip():
                texts[i].append(RawText(text, float(score), _xyxy(quad)))
        return texts

    def _detect(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Text quads per image, in its pixels; images of like shape share a call."""
        import cv2

        sizes = [self._det_size(*image.shape[:2]) for image in images]
        order = sorted(range(len(images)), key=lambda i: sizes[i])
        found: list[np.ndarray] = [np.zeros((0, 4, 2))] * len(images)
        for start in range(0, len(order), self.det_batch):
            group = order[start:start + self.det_batch]
            height = max(sizes[i][0] for i in group)
            width = max(sizes[i][1] for i in group)
            batch = np.zeros((len(group), 3, height, width), np.float32)  # 0 = mid grey once normalised
            for row, i in enumerate(group):
                h, w = sizes[i]
                resized = cv2.resize(images[i], (w, h)).astype(np.float32)
                batch[row, :, :h, :w] = (resized * (2 / 255) - 1).transpose(2, 0, 1)
            maps = self._run("det", batch)[:, 0]
            for row, i in enumerate(group):
                h, w = sizes[i]
                pred = maps[row, :h, :w]
                mask = cv2.dilate((pred > self.det_thresh).astype(np.uint8), np.ones((2, 2), np.uint8))
                src_h, src_w = images[i].shape[:2]
                quads, scores = self.boxes.boxes_from_bitmap(pred, mask, src_w, src_h)
                found[i], _ = self.boxes.filter_det_res(quads, scores, src_h, src_w)
        return found

    def _det_size(self, height: int, width: int) -> tuple[int, int]:
        """Longer side at --ocr-det-side, both sides multiples of 32 (the network's stride)."""
        scale = self.config.ocr_det_side / max(height, width)
        return (max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32))

    def _recognise(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """Text and confidence per crop. Crops of like width share a call: the model reads the
        whole padded line (attention), so a crop padded far past its width may read differently
        (a lost space); lines up to the minimum width pad to it exactly as rapidocr pads them."""
        widths = [max(self.min_line_width, math.ceil(self.line_height * c.shape[1] / c.shape[0])) for c in crops]
        order = sorted(range(len(crops)), key=lambda i: widths[i])
        out: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        group: list[int] = []
        for position, i in enumerate(order):
            group.append(i)
            following = order[position + 1] if position + 1 < len(order) else None
            if (following is None or len(group) == self.config.ocr_rec_batch
                    or widths[following] > self.max_pad * widths[group[0]]):
                lines, _ = self.decode(self._run("rec", _line_batch([crops[j] for j in group], self.line_height,
                                                                    widths[group[-1]])))
                for j, line in zip(group, lines, strict=True):
                    out[j] = line
                group = []
        return out

    def _turn_upside_down(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        crops = list(crops)
        for start in range(0, len(crops), self.config.ocr_rec_batch):
            group = range(start, min(len(crops), start + self.config.ocr_rec_batch))
            probs = self._run("cls", _line_batch([crops[i] for i in group], self.line_height, self.cls_width))
            for i, (label, score) in zip(group, self.angle(probs), strict=True):
                if label == "180" and score > self.cls_thresh:
                    crops[i] = np.ascontiguousarray(crops[i][::-1, ::-1])
        return crops

    def _run(self, task: str, batch: np.ndarray) -> np.ndarray:
        session = self.sessions[task]
        return session.run(None, {session.get_inputs()[0].name: batch})[0]


def _line_batch(crops: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Text-line crops resized to ``height`` (aspect kept, at most ``width``), left-aligned,
    zero-padded (PaddleOCR's recognition and angle-classifier input)."""
    import cv2

    batch = np.zeros((len(crops), 3, height, width), np.float32)
    for row, crop in enumerate(crops):
        w = min(width, math.ceil(height * crop.shape[1] / crop.shape[0]))
        resized = cv2.resize(crop, (w, height)).astype(np.float32)
        batch[row, :, :, :w] = (resized * (2 / 255) - 1).transpose(2, 0, 1)
    return batch


class RapidOcrBackend:
    """The ``rapidocr`` pipeline, pinned to local ONNX files so it never downloads; one image
    per call, on the CPU."""

    name = "rapidocr"

    def __init__(self, config: OcrSettings, device: str):
        folder = _model_folder(config)
        self.params = {
            "Global.log_level": "error",
            "Global.text_score": config.ocr_min_score,
            "Global.use_cls": config.ocr_angle_cls,
            "Det.model_path": str(_one_onnx(folder, "det")),
            "Rec.model_path": str(_one_onnx(folder, "rec")),
            "EngineConfig.onnxruntime.intra_op_num_threads": config.ocr_threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        if config.ocr_angle_cls:
            self.params["Cls.model_path"] = str(_one_onnx(folder, "cls"))
        self.describe = f"rapidocr {Path(self.params['Rec.model_path']).stem}"
        self.engine = None

    def load(self) -> None:
        from rapidocr import RapidOCR

        self.engine = RapidOCR(params=self.params)

    def detect_and_read(self, images: list[np.ndarray]) -> list[list[RawText]]:
        return [self._one(image) for image in images]

    def _one(self, image: np.ndarray) -> list[RawText]:
        result = self.engine(np.ascontiguousarray(image[:, :, ::-1]))  # it takes arrays as BGR
        if result.boxes is None or result.txts is None:
            return []
        return [
            RawText(text, float(score), _xyxy(box))
            for box, text, score in zip(result.boxes, result.txts, result.scores, strict=True)
        ]


class PaddleOcrBackend:
    """PaddleOCR 3.x on local inference-model folders (``det/`` and ``rec/``)."""

    name = "paddleocr"

    def __init__(self, config: OcrSettings, device: str):
        if not config.ocr_model_dir:
            raise ConfigError(
                "--ocr-backend paddleocr needs --ocr-model-dir with det/ and rec/ PaddleOCR "
                "inference models (it cannot download offline); or use --ocr-backend rapidocr"
            )
        folder = Path(config.ocr_model_dir).expanduser()
        missing = [sub for sub in ("det", "rec") if not (folder / sub).is_dir()]
        if missing:
            raise ConfigError(f"--ocr-model-dir {folder} lacks the model folder(s) {missing}")
        try:
            import paddleocr  # noqa: F401 - only checking that it is there
        except ImportError:
            raise ConfigError(
                "--ocr-backend paddleocr: the paddleocr package is not installed "
                "(pip install paddleocr paddlepaddle), or use --ocr-backend rapidocr"
            ) from None
        self.folder = folder
        self.config = config
        self.describe = f"paddleocr {folder}"
        self.engine = None

    def load(self) -> None:
        # local folders only: skip the model hosts check that fails offline
        os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
        from paddleocr import PaddleOCR

        self.engine = PaddleOCR(
            text_detection_model_dir=str(self.folder / "det"),
            text_recognition_model_dir=str(self.folder / "rec"),
            use_doc_orientation_classify=False,
            use_doc_unwarping=False,
            use_textline_orientation=self.config.ocr_angle_cls,
            text_rec_score_thresh=self.config.ocr_min_score,
        )

    def detect_and_read(self, images: list[np.ndarray]) -> list[list[RawText]]:
        return [self._one(image) for image in images]

    def _one(self, image: np.ndarray) -> list[RawText]:
        texts = []
        for page in self.engine.predict(image[:, :, ::-1]):  # PaddleOCR expects BGR
            for text, score, poly in zip(
                page["rec_texts"], page["rec_scores"], page["rec_polys"], strict=True
            ):
                texts.append(RawText(text, float(score), _xyxy(poly)))
        return texts


_BACKENDS = {"batched": BatchedPpOcr, "rapidocr": RapidOcrBackend, "paddleocr": PaddleOcrBackend}


def backend_names() -> tuple[str, ...]:
    """The OCR backends, by name (the config's choices)."""
    return tuple(_BACKENDS)
