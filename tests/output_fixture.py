"""A small output folder written by the engine's own writer, with annotations filled in by hand
(captions, tags, boxes, OCR, scores) so statistics, exports and the report have known content."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from engine.core.record import Sample, ShardEnd, Source
from engine.io.manifest import Manifest
from engine.io.writers import DatasetWriter
from models.records import Box, Caption, OcrLine, Tag

CAPTIONS = {
    "s0": "A red car is parked on the street. Two people walk past it quickly.",
    "s1": "The poster says GRAND OPENING in large letters. It shows 3 loaves of bread!",
    "s2": "",
}


def _jpeg(color: tuple[int, int, int], size=(64, 48)) -> bytes:
    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle((8, 8, 30, 30), fill=(255 - color[0], 90, 200))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def fixture_samples(shard: str = "00000") -> list[Sample]:
    def sample(key: str, **fields) -> Sample:
        s = Sample(key=key, source=Source(shard, f"/in/{shard}.tar", f"{key}.jpg"),
                   image_bytes=_jpeg((40 * len(key), 120, 60)), width=64, height=48,
                   image_format="JPEG", **fields)
        if CAPTIONS.get(key):
            s.caption = Caption(CAPTIONS[key], 500, 20, "stop", 0.1, "tiny", "transformers")
        return s

    samples = [
        sample("s0", alt_text="red car parked", meta={"url": "https://example.com/s0.jpg"},
               tags=[Tag("car", 0.9), Tag("person", 0.8), Tag("tree", 0.5)],
               boxes=[Box("car", 0.9, (0.1, 0.2, 0.6, 0.8), "fused")],
               scores={"category:photo": 0.8, "category:infographic": 0.2}),
        sample("s1", alt_text="grand opening poster", meta={},
               tags=[Tag("poster", 0.9), Tag("bread", 0.7)],
               ocr=[OcrLine("GRAND OPENING", 0.99, (0.1, 0.1, 0.9, 0.3)),
                    OcrLine("FRESH BREAD DAILY", 0.95, (0.1, 0.5, 0.9, 0.7))],
               scores={"category:photo": 0.3, "category:commercial design": 0.7}),
        sample("s2"),
        sample("bad"),
    ]
    samples[-1].fail("decode", "OSError: truncated JPEG")
    return samples


def write_fixture_output(out: Path, samples: list[Sample] | None = None) -> Path:
    samples = fixture_samples() if samples is None else samples
    writer = DatasetWriter(out, Manifest(out))
    for s in samples:
        writer.write(s)
    shard = samples[0].source.shard
    writer.commit(ShardEnd(shard, f"/in/{shard}.tar", len(samples)))
    return out
