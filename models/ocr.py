"""OCR expert: PP-OCR text detection + recognition, lines in reading order.

Backends:
- ``rapidocr`` (default): the PP-OCR detection/recognition ONNX models that the ``rapidocr``
  wheel ships, run by ONNX Runtime; works offline, so it is also what ``--models tiny`` uses.
  ``--ocr-model-dir`` may point at a folder with other ``*det*.onnx`` / ``*rec*.onnx`` files.
- ``paddleocr``: PaddleOCR 3.x on local model folders (``--ocr-model-dir`` with ``det/`` and
  ``rec/`` inference-model folders). It never is the default: without local folders it tries
  to reach its model hosts and refuses to start offline.

Whatever the backend, the result is the same: :class:`OcrLine` per text box, its text in the
original language, its box normalised to [0, 1] of the image it was read from (the OCR view is
a uniform resize of the original, so that equals the original's normalised box), ordered top
to bottom and left to right, filtered by confidence and capped in lines and characters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.core.config import OcrConfig
from engine.core.errors import ConfigError
from engine.core.record import OcrLine
from engine.evidence.boxes import normalise_pixels


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

    def detect_and_read(self, image: np.ndarray) -> list[RawText]: ...


class OcrModel:
    """One OCR session per worker: ``read(image)`` gives ordered, filtered, capped lines."""

    def __init__(self, config: OcrConfig):
        self.config = config
        self.backend: OcrBackend = _BACKENDS[config.ocr_backend](config)  # checks files only

    def load(self) -> None:
        """Start the inference session; once per worker, in the thread that will use it."""
        self.backend.load()

    def read(self, image: np.ndarray) -> list[OcrLine]:
        height, width = image.shape[:2]
        found = [
            t
            for t in self.backend.detect_and_read(image)
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


class RapidOcrBackend:
    """The ``rapidocr`` pipeline, pinned to local ONNX files so it never downloads."""

    name = "rapidocr"

    def __init__(self, config: OcrConfig):
        try:
            import rapidocr
        except ImportError:
            raise ConfigError("OCR backend rapidocr is not installed: pip install rapidocr") from None
        folder = Path(config.ocr_model_dir or Path(rapidocr.__file__).parent / "models")
        if not folder.is_dir():
            raise ConfigError(f"--ocr-model-dir {folder} is not a folder")
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

    def detect_and_read(self, image: np.ndarray) -> list[RawText]:
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

    def __init__(self, config: OcrConfig):
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

    def detect_and_read(self, image: np.ndarray) -> list[RawText]:
        texts = []
        for page in self.engine.predict(image[:, :, ::-1]):  # PaddleOCR expects BGR
            for text, score, poly in zip(
                page["rec_texts"], page["rec_scores"], page["rec_polys"], strict=True
            ):
                texts.append(RawText(text, float(score), _xyxy(poly)))
        return texts


_BACKENDS = {"rapidocr": RapidOcrBackend, "paddleocr": PaddleOcrBackend}
