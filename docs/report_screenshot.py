"""Regenerate docs/report.png, the README's picture of the HTML report.

    python docs/report_screenshot.py

The demo's tiny models write noise, so this builds one output shard from the demo's images
with hand-written expert results and captions, scores them with the real score stage, writes
it with the engine's writer, renders the report and screenshots it in Debian's Chromium.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.core.config import ScoreConfig  # noqa: E402
from engine.core.record import Sample, ShardEnd, Source
from engine.evidence.category import as_scores  # noqa: E402
from engine.io.demo_data import demo_members  # noqa: E402
from engine.io.manifest import Manifest  # noqa: E402
from engine.io.writers import DatasetWriter  # noqa: E402
from engine.output.report import build_report  # noqa: E402
from engine.stages.score import ScoreStage  # noqa: E402
from models.records import Box, Caption, OcrLine, Tag

CAPTIONS = {
    "scene": "The image shows several colorful shapes on a pale background. A large red circle sits near "
             "the top left, and a blue rectangle overlaps a green ellipse in the center. A small ball "
             "rests beside a box.",
    "poster": "A cream poster with dark blue text. The headline reads GRAND OPENING, and below it the "
              "words FRESH BREAD DAILY announce a bakery. A loaf of bread is not shown.",
    "slide": "A white presentation slide with black text. The title reads Quarterly Results and the line "
             "below says Revenue grew twelve percent.",
}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def annotated_samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    members = sorted(demo_members(0), key=lambda m: m.meta["kind"] not in ("poster", "slide"))
    samples = []
    for m in members:
        kind = m.meta["kind"]
        s = Sample(key=m.key, source=Source("demo-00000", "demo-00000.tar", m.key), image_bytes=m.image,
                   image_ext=m.ext, alt_text=m.alt_text, meta=m.meta)
        if kind == "broken":
            s.fail("decode", "OSError: image file is truncated" if m.image else "empty image bytes")
            samples.append(s)
            continue
        with Image.open(io.BytesIO(m.image)) as image:
            s.width, s.height = image.size
        if kind == "small":
            s.filter("probe", f"short edge {min(s.width, s.height)} < 448")
        elif kind == "scene":
            s.tags = [Tag("circle", 0.8), Tag("rectangle", 0.7), Tag("ball", 0.6)]
            s.boxes = [Box("ball", 0.7, (0.1, 0.1, 0.35, 0.4), "fused"), Box("box", 0.6, (0.5, 0.45, 0.8, 0.8), "fused")]
        else:
            s.tags = [Tag("poster" if kind == "poster" else "text", 0.9)]
            s.ocr = [OcrLine(t, 0.95, (0.08, 0.15 + 0.18 * i, 0.8, 0.27 + 0.18 * i))
                     for i, t in enumerate(m.meta.get("rendered_text", []))]
        if s.alive:
            s.caption = Caption(CAPTIONS[kind], 900, 60, "stop", 1.2, "hand-written", "none")
            s.scores.update(as_scores(rng.dirichlet(np.ones(6) * 0.4)))  # stand-in category scores
        samples.append(s)
    return samples


def main() -> int:
    from playwright.sync_api import sync_playwright

    samples = annotated_samples()
    stage = ScoreStage(ScoreConfig())
    stage.process([s for s in samples if s.alive])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        writer = DatasetWriter(out, Manifest(out))
        for s in samples:
            writer.write(s)
        writer.commit(ShardEnd("demo-00000", "demo-00000.tar", len(samples)))
        page_path = build_report(out, samples=6)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 2100})
            page.goto(page_path.as_uri())
            page.screenshot(path=str(ROOT / "docs" / "report.png"), full_page=True,
                            clip={"x": 0, "y": 0, "width": 1280, "height": 2100})
            browser.close()
    shot = ROOT / "docs" / "report.png"
    Image.open(shot).convert("RGB").quantize(256).save(shot, optimize=True)  # a third of the bytes
    print(shot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
