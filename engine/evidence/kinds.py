"""The paper's evidence kinds, declared once (engine/core/registry.py's ``Evidence``): tags, boxes,
OCR lines. Each is a ``Sample`` field and a list of ``models.records`` values; the writer's parquet
columns and the expert cache's codec come from here. Their place in the fusion prompt is the
paper's fixed template (engine/evidence/prompt.py), so none declares a prompt section."""

from __future__ import annotations

from dataclasses import asdict

import pyarrow as pa

from engine.core.registry import Evidence
from models.records import Box, OcrLine, Tag

_XYXY = pa.list_(pa.float64())


def _encode(values: list) -> list[dict]:
    return [asdict(v) for v in values]


TAGS = Evidence("tags", pa.list_(pa.struct([("name", pa.string()), ("score", pa.float64())])),
                _encode, lambda rows: [Tag(**r) for r in rows])
BOXES = Evidence("boxes", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64()),
                                              ("xyxy", _XYXY), ("source", pa.string())])),
                 _encode, lambda rows: [Box(r["label"], r["score"], tuple(r["xyxy"]), r["source"]) for r in rows])
OCR = Evidence("ocr", pa.list_(pa.struct([("text", pa.string()), ("score", pa.float64()), ("xyxy", _XYXY)])),
               _encode, lambda rows: [OcrLine(r["text"], r["score"], tuple(r["xyxy"])) for r in rows])

KINDS = (TAGS, BOXES, OCR)
