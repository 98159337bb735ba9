"""The report renders in a real headless Chromium (Debian's package, driven by Playwright)."""

import io
from pathlib import Path

import numpy as np
import pytest
from output_fixture import CAPTIONS, write_fixture_output
from PIL import Image

from engine.io.manifest import read_manifest
from engine.output.report import boxes_overlay, build_report, main

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_boxes_are_drawn_in_thumbnail_pixels():
    svg = boxes_overlay([{"label": "car <1>", "score": 0.9, "xyxy": [0.1, 0.2, 0.6, 0.8]}], 200, 100)
    assert 'viewBox="0 0 200 100"' in svg
    assert 'x="20.0" y="20.0" width="100.0" height="60.0"' in svg
    assert "car &lt;1&gt; 0.90" in svg  # labels are escaped
    with_ocr = boxes_overlay([], 200, 100, [{"text": "SALE", "score": 0.9, "xyxy": [0.5, 0.5, 1.0, 1.0]}])
    assert 'class="ocr" x="100.0" y="50.0" width="100.0" height="50.0"' in with_ocr


def test_report_file_holds_every_part(tmp_path):
    out = write_fixture_output(tmp_path / "out")
    assert main([str(out)]) == 0
    page = (out / "report.html").read_text()
    for section in ("summary", "table1", "charts", "samples", "rejects"):
        assert f'id="{section}"' in page
    assert page.count('class="sample"') == 3 and page.count("<img") == 3
    assert "truncated JPEG" in page  # the reject's reason
    assert "GRAND OPENING" in page and "red car parked" in page
    assert CAPTIONS["s0"] in page and "cov_tags" not in page  # the fixture's samples were not scored
    assert 'src="http' not in page and 'href="http' not in page  # self-contained: nothing to fetch
    # no run into it used tiny models (it has no metrics.json): no noise banner; one that did gets it
    assert "tiny-banner" not in page and "tiny-table1" not in page
    (out / "metrics.json").write_text('{"invocations": [{"config": {"runtime": {"models": ""}}}, '
                                      '{"config": {"runtime": {"models": "tiny"}}}]}')
    assert main([str(out)]) == 0
    page = (out / "report.html").read_text()
    assert page.count('id="tiny-banner"') == page.count('id="tiny-table1"') == 1


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium package is required (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_report_renders_in_headless_chromium(tmp_path, browser):
    out = write_fixture_output(tmp_path / "out")
    path = build_report(out)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(path.resolve().as_uri())
    assert page.title().startswith("densefusion report")
    for section in ("#summary", "#table1", "#charts", "#samples", "#rejects"):
        assert page.locator(section).is_visible()
    assert page.locator(".chart svg").count() >= 4
    assert page.locator(".sample").count() == 3
    assert page.locator(".sample img").evaluate_all("imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")
    box = page.locator('.sample[data-key="s0"] svg.boxes rect.box').bounding_box()
    frame = page.locator('.sample[data-key="s0"] .frame img').bounding_box()
    # box s0 spans x 0.1..0.6 of the image; the 2 px stroke adds 1 px on each side
    assert box["width"] == pytest.approx(0.5 * frame["width"] + 2, abs=1)
    assert page.locator('.sample[data-key="s1"] svg.boxes rect.ocr').count() == 2
    assert page.locator("#rejects-table tr").count() == 2  # header + one reject
    assert failed == []
    shot = page.screenshot(full_page=True)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=float)
    assert pixels.shape[0] > 900 and pixels.std() > 10  # a page with content, not a blank sheet
    page.close()


def test_report_of_the_demo_output(tmp_path, browser):
    import json

    import densefusion_local

    out = tmp_path / "demo"
    assert densefusion_local.main(["demo", "--out", str(out), "--no-progress"]) == 0
    manifest = read_manifest(out).values()
    written, rejected = sum(s["written"] for s in manifest), sum(s["rejected"] for s in manifest)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(build_report(out, samples=4).resolve().as_uri())
    stats = json.loads((out / "stats.json").read_text())
    assert stats["table1"]["samples"] == written and stats["rejects"]["total"] == rejected
    assert page.locator(".sample").count() == min(4, written)
    assert page.locator("#rejects-table tr").count() == rejected + 1
    assert page.locator("#summary").inner_text().count(str(written)) >= 1
    page.close()


def test_box_labels_get_a_background_and_do_not_overlap():
    from engine.output.report import place_labels

    same_corner = [{"label": name, "score": 0.9, "xyxy": [0.1, 0.1, 0.5, 0.5]} for name in ("car", "person", "tree")]
    svg = boxes_overlay(same_corner, 200, 200)
    assert svg.count('<g class="label"><rect') == 3 and 'fill="#fff"' in svg  # white text on a filled tag
    corners = place_labels([(20, 20, 100, 100)] * 3, [(50, 14)] * 3, 200, 200)
    spans = sorted(y for _, y in corners)
    assert spans[1] - spans[0] >= 14 and spans[2] - spans[1] >= 14  # stacked, not drawn over each other
    assert all(0 <= x <= 150 and 0 <= y <= 186 for x, y in corners)  # inside the picture


def _output_with_flags_prompt_and_a_broken_shard(out):
    from output_fixture import fixture_samples

    from engine.core.record import ShardEnd
    from engine.io.manifest import Manifest
    from engine.io.writers import DatasetWriter

    samples = fixture_samples()
    samples[0].flags = ["unfinished: ends mid-sentence"]
    samples[1].prompt = "[OCR]\nGRAND OPENING\n" + "x" * 600  # one long unbroken word
    write_fixture_output(out, samples)
    DatasetWriter(out, Manifest(out)).commit(
        ShardEnd("broken", "/in/broken.tar", 0, ("/in/broken.tar: tar ends early or is corrupt (empty file)",)))
    return out


def test_report_shows_flags_prompt_and_shard_problems_in_chromium(tmp_path, browser):
    path = build_report(_output_with_flags_prompt_and_a_broken_shard(tmp_path / "out"))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(path.resolve().as_uri())
    flags = page.locator('.sample[data-key="s0"] .flags')
    assert flags.is_visible() and "unfinished: ends mid-sentence" in flags.inner_text()
    assert "none" in page.locator('.sample[data-key="s1"] .flags').inner_text()
    prompt = page.locator('.sample[data-key="s1"] details.prompt')
    prompt.locator("summary").click()
    assert "GRAND OPENING" in prompt.inner_text()
    text = prompt.locator(".caption")  # the long word wraps inside its box instead of running out of it
    assert text.evaluate("e => e.scrollWidth <= e.clientWidth")
    problems = page.locator("#shard-problems")
    assert problems.is_visible() and "broken" in problems.inner_text() and "empty file" in problems.inner_text()
    summary = page.locator("#summary").inner_text()
    assert "shards with problems\t1" in summary and "items_per_busy_s" not in summary and "None" not in summary
    page.close()
