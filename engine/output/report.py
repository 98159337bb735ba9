"""A static HTML report of an output folder: one self-contained file, no server.

    python densefusion_local.py report OUT [--samples 24] [--to OUT/report.html]

Shows the output's totals (from the manifest) and every invocation of the run (metrics.json),
the Table 1 statistics, charts of the distributions (matplotlib, inline SVG), a sample of
images (inline thumbnails) with their fused boxes drawn as an SVG overlay, tags, OCR lines, alt
text, caption, quality-control flags, prompt and coverage scores, the shards that ended early or
held nothing, and the rejects with their reasons. Statistics come from OUT/stats.json, recomputed when missing or
older than the manifest.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.figures import OutputTotals, describe_cache, expert_cache_figures
from engine.evidence.category import SCORE_PREFIX, category_of
from engine.io.manifest import Manifest
from engine.io.object_output import output_folder
from engine.output.dataset_reader import (
    WrittenSample,
    check_output,
    iter_rejects,
    iter_samples,
    read_json,
    tiny_model_runs,
)
from engine.output.stats import (
    PAPER_ROWS,
    POS_COLUMNS,
    TABLE1_HEADER,
    TINY_TABLE1_NOTE,
    default_workers,
    output_stats,
    table1_row,
)

THUMB_SIDE = 360
MAX_REJECT_ROWS = 200
_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#808000")

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fff;border:1px solid #ddd;padding:8px}
.chart svg{width:290px;height:auto}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:16px}
.sample{background:#fff;border:1px solid #ddd;padding:10px;font-size:13px}
.frame{position:relative;display:inline-block;line-height:0}.frame img{max-width:100%}
.frame svg{position:absolute;left:0;top:0;width:100%;height:100%}
.tag{display:inline-block;background:#eef;border-radius:3px;padding:1px 5px;margin:1px}
.caption{white-space:pre-wrap;background:#f4f4f4;padding:6px;max-height:220px;overflow:auto}
.sample,.caption,td.wrap,li{overflow-wrap:anywhere}
.flags ul{margin:2px 0;padding-left:18px}.flag{color:#9a3412}
.prompt summary{cursor:pointer}
.top{display:flex;flex-wrap:wrap;gap:48px}.muted{color:#777}
.banner{background:#fff3cd;border:1px solid #e0a800;padding:8px 12px;font-weight:bold;max-width:60em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG needs neither


def _bar_chart(title: str, labels: list[str], values: list[float], xlabel: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(3.9, 2.4))
    axes.barh(labels[::-1], values[::-1], color="#4363d8")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    figure.tight_layout()
    svg = _svg(figure)
    plt.close(figure)
    return svg


def _histogram_chart(title: str, hist: dict[str, list]) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(3.9, 2.4))
    edges, counts = hist["edges"], hist["counts"]
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge",
             color="#3cb44b", edgecolor="white")
    axes.set_title(title)
    axes.set_ylabel("captions")
    figure.tight_layout()
    svg = _svg(figure)
    plt.close(figure)
    return svg


def charts(stats: dict[str, Any]) -> list[str]:
    out = []
    for name, label in (("words", "words per caption"), ("chars", "characters per caption"),
                        ("sentences", "sentences per caption")):
        if stats["histograms"][name]["counts"]:
            out.append(_histogram_chart(label, stats["histograms"][name]))
    t = stats["table1"]
    if t["captions"]:
        names = list(POS_COLUMNS.values())
        out.append(_bar_chart("parts of speech (share of words)", names,
                              [100 * t[n] for n in names], "%"))
    shares = [n for n in stats["coverage"] if n != "unseen_nouns"]  # a count, not a share
    if shares:
        out.append(_bar_chart("evidence coverage (mean share)", shares,
                              [stats["coverage"][n]["mean"] for n in shares]))
    if stats["categories"]:
        out.append(_bar_chart("image categories", list(stats["categories"]),
                              list(stats["categories"].values()), "images"))
    if stats["rejects"]["by_stage"]:
        by_stage = stats["rejects"]["by_stage"]
        out.append(_bar_chart("rejects by stage", [k or "?" for k in by_stage], list(by_stage.values()),
                              "samples"))
    return out


def thumbnail(image_bytes: bytes) -> tuple[str, int, int]:
    """(data URL, width, height) of a JPEG thumbnail; EXIF orientation applied like the engine."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image_bytes)) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        size = image.size
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), *size


LABEL_FONT_PX = 11
LABEL_HEIGHT = 14
LABEL_CHAR_WIDTH = 6.6  # bold system-ui at 11 px, generous: a label box too wide beats clipped text


def place_labels(boxes: list[tuple[float, float, float, float]], sizes: list[tuple[float, float]],
                 width: float, height: float) -> list[tuple[float, float]]:
    """Top-left corners for box labels (pixel boxes, label sizes) that overlap as little as
    possible: just above the box, else inside its top edge, else below it, else lower down
    inside the box; labels already placed win. A label that fits nowhere free goes above or
    inside its box's top edge all the same."""
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for (x0, y0, _x1, y1), (w, h) in zip(boxes, sizes):
        x = max(0.0, min(x0, width - w))
        candidates = [y0 - h, y0, y1] + [y0 + h * k for k in range(1, int(max(y1 - y0, 0) // h))]
        inside = [y for y in candidates if 0 <= y <= height - h]
        free = [y for y in inside if not any(x < px1 and px < x + w and y < py1 and py < y + h
                                             for px, py, px1, py1 in placed)]
        y = (free or inside or [max(0.0, min(y0, height - h))])[0]
        placed.append((x, y, x + w, y + h))
        corners.append((x, y))
    return corners


def boxes_overlay(boxes: list[dict[str, Any]], width: int, height: int,
                  ocr: list[dict[str, Any]] = ()) -> str:
    """Boxes are normalised to [0, 1]; the SVG uses the thumbnail's pixel space so text keeps
    its proportions, and is stretched over the image by CSS. OCR lines get dashed outlines.
    Labels sit on a filled tag of the box's colour (readable on any photo), placed so they
    overlap as little as they can (:func:`place_labels`)."""
    parts = [f'<svg class="boxes" viewBox="0 0 {width} {height}" preserveAspectRatio="none">']
    for line in ocr:
        x0, y0, x1, y1 = line["xyxy"]
        parts.append(
            f'<rect class="ocr" x="{x0 * width:.1f}" y="{y0 * height:.1f}" width="{(x1 - x0) * width:.1f}" '
            f'height="{(y1 - y0) * height:.1f}" fill="none" stroke="#555" stroke-width="1.5" stroke-dasharray="4 3"/>'
        )
    pixel_boxes = [(b["xyxy"][0] * width, b["xyxy"][1] * height, b["xyxy"][2] * width, b["xyxy"][3] * height)
                   for b in boxes]
    labels = [f'{box["label"]} {box["score"]:.2f}' for box in boxes]
    sizes = [(len(text) * LABEL_CHAR_WIDTH + 6, LABEL_HEIGHT) for text in labels]
    for i, (x0, y0, x1, y1) in enumerate(pixel_boxes):
        parts.append(
            f'<rect class="box" x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
            f'fill="none" stroke="{_COLORS[i % len(_COLORS)]}" stroke-width="2"/>'
        )
    for i, ((x, y), (w, h), text) in enumerate(zip(place_labels(pixel_boxes, sizes, width, height), sizes, labels)):
        parts.append(
            f'<g class="label"><rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="2" '
            f'fill="{_COLORS[i % len(_COLORS)]}" fill-opacity="0.85"/>'
            f'<text x="{x + 3:.1f}" y="{y + h - 3.5:.1f}" fill="#fff" font-size="{LABEL_FONT_PX}" '
            f'font-weight="bold">{_e(text)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def sample_card(sample: WrittenSample) -> str:
    a = sample.annotations
    try:
        src, w, h = thumbnail(sample.image_bytes)
        picture = (f'<div class="frame"><img src="{src}" width="{w}" height="{h}" alt="{_e(sample.key)}">'
                   f'{boxes_overlay(a.get("boxes") or [], w, h, a.get("ocr") or [])}</div>')
    except Exception as exc:  # noqa: BLE001 - a picture the browser cannot show must not end the report
        picture = f'<p class="muted">image not shown: {_e(type(exc).__name__)}</p>'
    tags = "".join(f'<span class="tag">{_e(t["name"])} {t["score"]:.2f}</span>' for t in a.get("tags") or [])
    ocr = "".join(f"<li>{_e(o['text'])}</li>" for o in a.get("ocr") or [])
    all_scores = a.get("scores") or {}
    category = category_of(all_scores)
    scores = ", ".join(f"{_e(k)} {v:.2f}" for k, v in sorted(all_scores.items())
                       if not k.startswith(SCORE_PREFIX))
    caption = a.get("caption") or ""
    flags = "".join(f'<li class="flag">{_e(f)}</li>' for f in a.get("flags") or [])
    prompt = a.get("prompt") or ""
    return (
        f'<div class="sample" data-key="{_e(sample.key)}"><b>{_e(sample.key)}</b> '
        f'<span class="muted">{a.get("width")}×{a.get("height")}, shard {_e(a.get("shard", ""))}</span><br>'
        f"{picture}"
        f"<div><b>tags</b> {tags or '<span class=muted>none</span>'}</div>"
        f"<div><b>boxes</b> {len(a.get('boxes') or [])}</div>"
        f"<div><b>OCR</b>{f'<ul>{ocr}</ul>' if ocr else ' <span class=muted>none</span>'}</div>"
        f"<div><b>alt text</b> {_e(a.get('alt_text') or '') or '<span class=muted>none</span>'}</div>"
        f"<div><b>caption</b>{f'<div class=caption>{_e(caption)}</div>' if caption else ' <span class=muted>none</span>'}</div>"
        f"<div class=flags><b>quality-control flags</b>"
        f"{f'<ul>{flags}</ul>' if flags else ' <span class=muted>none</span>'}</div>"
        + (f'<details class="prompt"><summary><b>prompt</b> <span class="muted">({len(prompt):,} characters)</span>'
           f'</summary><div class="caption">{_e(prompt)}</div></details>' if prompt else "")
        + f"<div><b>scores</b> {scores or '<span class=muted>none</span>'}</div>"
        + (f"<div><b>category</b> {_e(category)} {all_scores[SCORE_PREFIX + category]:.2f}</div>"
           if category else "")
        + "</div>"
    )


def _figures_table(title: str, rows: list[tuple[str, Any]]) -> str:
    body = "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>' for k, v in rows)
    return f"<h3>{_e(title)}</h3><table>{body}</table>"


def _number(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{unit}" if isinstance(value, float) else f"{value:,}{unit}"


# metrics.json's per-stage fields under the names a reader knows
STAGE_COLUMNS = (("stage", "stage"), ("items", "images"), ("items_per_busy_s", "images/s while busy"),
                 ("busy_share", "busy share of the run"), ("description", "what ran"))


def _stage_cell(column: str, value: Any) -> str:
    if column == "busy_share":
        return "–" if value is None else f"{value:.0%}"
    return _number(value) if column in ("items", "items_per_busy_s") else _e(value)


def run_figures(totals: OutputTotals, metrics: dict[str, Any]) -> str:
    """The output's totals (from the manifest), every invocation of the run, the latest stage figures."""
    parts = [_figures_table("output", [
        ("shards committed", _number(totals.shards)),
        ("samples read", _number(totals.samples)),
        ("written", _number(totals.written)),
        ("rejected", _number(totals.rejected)),
        ("shards with problems", _number(len(totals.shard_problems))),
    ])]
    invocations = metrics.get("invocations") or []
    if invocations:
        killed = sum(1 for i in invocations if i.get("status") == "killed")
        rows = [("runs into this folder", f"{len(invocations)}" + (f" ({killed} killed)" if killed else "")),
                ("time running", _number(metrics.get("wall_s"), 1, " s")),
                ("images per second", _number(metrics.get("images_per_s"), 2)),
                ("device", invocations[-1].get("device") or "–")]
        rows += [(f"expert cache: {stage}", describe_cache(figures))
                 for stage, figures in (metrics.get("expert_cache") or {}).items()]
        parts.append(_figures_table("runs", rows))
        head = "".join(f'<th class="l">{h}</th>' for h in
                       ("started (UTC)", "pass", "status", "written", "rejected", "shards committed", "time"))
        body = "".join(
            "<tr>" + "".join(f'<td class="l">{v}</td>' for v in (
                _e(i.get("started_at", "")), _e(i.get("pass", "")), _e(i.get("status", "")),
                _number(i.get("written")), _number(i.get("rejected")), _number(i.get("shards_committed")),
                _number(i.get("wall_s"), 1, " s"))) + "</tr>"
            for i in invocations)
        parts.append(f'<h3>invocations</h3><table id="invocations-table"><tr>{head}</tr>{body}</table>')
    stages = metrics.get("stages") or []
    if stages:
        cache = expert_cache_figures(stages)
        head = "".join(f'<th class="l">{_e(label)}</th>' for _, label in STAGE_COLUMNS)
        head += '<th class="l">expert cache</th>' if cache else ""
        rows = "".join(
            "<tr>" + "".join(f'<td class="l">{_stage_cell(c, s.get(c))}</td>' for c, _ in STAGE_COLUMNS)
            + (f'<td class="l">{_e(describe_cache(cache.get(s["stage"], {})))}</td>' if cache else "") + "</tr>"
            for s in stages)
        parts.append(f'<h3>stages (latest run that processed images)</h3><table id="stages-table"><tr>{head}</tr>{rows}</table>')
    return "".join(parts)


def shard_problems_html(totals: OutputTotals) -> str:
    problems = totals.shard_problems
    if not problems:
        return '<p class="muted">none: every committed shard was read to its end</p>'
    rows = "".join(f'<tr><td class="l">{_e(shard)}</td><td class="l wrap">{_e(message)}</td></tr>'
                   for shard, messages in problems.items() for message in messages)
    return f'<table id="shard-problems-table"><tr><th class="l">shard</th><th class="l">problem</th></tr>{rows}</table>'


TINY_BANNER = ("Written with tiny random-weight models (--models tiny): every caption, tag and box here is "
               "noise. Such a run checks the machinery; real captions need real checkpoints (see the README).")


def table1_html(stats: dict[str, Any], *, tiny: bool = False) -> str:
    head = f'<th class="l">{_e(TABLE1_HEADER[0])}</th>' + "".join(f"<th>{_e(h)}</th>" for h in TABLE1_HEADER[1:])
    rows = "".join(f'<tr{" class=muted" if paper else ""}><th class="l">{_e(row[0])}</th>'
                   + "".join(f"<td>{_e(v)}</td>" for v in row[1:]) + "</tr>"
                   for paper, row in [(False, table1_row(stats))] + [(True, r) for r in PAPER_ROWS])
    parts = [f'<p id="tiny-table1" class="banner">{_e(TINY_TABLE1_NOTE)}</p>' if tiny else "",
             f'<table id="table1-table"><tr>{head}</tr>{rows}</table>',
             (f'<p class="muted">{stats["table1"]["captions"]} captions; parts of speech by the '
              f'{_e(stats["pos_tagger"])} tagger, as shares of all caption words; grey rows: the paper</p>')]
    if stats["coverage"]:
        rows = "".join(f'<tr><th class="l">{_e(name)}</th><td>{s["mean"]:.3f}</td><td>{_median(s)}</td>'
                       f'<td>{s["samples"]}</td></tr>' for name, s in stats["coverage"].items())
        parts.append('<h3>evidence coverage</h3><table id="coverage-table"><tr><th class="l">score</th>'
                     f"<th>mean</th><th>median</th><th>samples</th></tr>{rows}</table>")
    return "".join(parts)


def _median(summary: dict[str, Any]) -> str:
    """A coverage median, with how far it may be from the exact one once stats binned the values."""
    within = summary.get("median_within")
    return f"{summary['median']:.3f}" + (f" ±{within:.2g}" if within else "")


def rejects_table(rejects: Iterable[dict[str, Any]], total: int) -> str:
    """The first rejects (``total`` of them in all)."""
    rejects = list(itertools.islice(rejects, MAX_REJECT_ROWS))
    if not rejects:
        return '<p class="muted">no rejects</p>'
    rows = "".join(
        f'<tr><td class="l">{_e(r.get("key", ""))}</td><td class="l">{_e(r.get("shard", ""))}</td>'
        f'<td class="l">{_e(r.get("stage", ""))}</td><td class="l">{_e(r.get("status", ""))}</td>'
        f'<td class="l">{_e(r.get("reason", ""))}</td></tr>'
        for r in rejects)
    more = (f'<p class="muted">{total - len(rejects)} more in rejects/*.parquet</p>'
            if total > len(rejects) else "")
    return ('<table id="rejects-table"><tr><th class="l">key</th><th class="l">shard</th>'
            f'<th class="l">stage</th><th class="l">status</th><th class="l">reason</th></tr>{rows}</table>{more}')


def build_report(out: Path, *, samples: int = 24, to: Path | None = None) -> Path:
    out = check_output(Path(out))
    manifest = Manifest(out)
    stats = read_json(out / "stats.json") if _fresh(out / "stats.json", manifest.path) else None
    stats = stats or output_stats(out, workers=default_workers())
    cards = []
    for sample in iter_samples(out, with_images=True):
        if len(cards) >= samples:
            break
        cards.append(sample_card(sample))
    # The manifest is what the output holds (metrics.json's totals are derived from it too, but a
    # killed invocation may have committed shards after metrics.json was last written).
    metrics = read_json(out / "metrics.json")
    totals = OutputTotals.of(manifest)
    figures = run_figures(totals, metrics)
    tiny = tiny_model_runs(metrics) > 0  # any run into the folder: its samples are mixed in
    rejected = stats["rejects"]["total"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>densefusion report: {_e(out.name)}</title>
<style>{CSS}</style></head><body>
<h1>densefusion report</h1><p class="muted">{_e(out.resolve())}</p>
{f'<p id="tiny-banner" class="banner">{_e(TINY_BANNER)}</p>' if tiny else ""}
<div class="top"><section id="summary"><h2>Run</h2>{figures}</section>
<section id="table1"><h2>Statistics (paper Table 1)</h2>{table1_html(stats, tiny=tiny)}</section></div>
<section id="charts"><h2>Distributions</h2><div class="charts">
{"".join(f'<div class="chart">{svg}</div>' for svg in charts(stats))}</div></section>
<section id="samples"><h2>Samples ({len(cards)} of {stats["table1"]["samples"]})</h2>
<div class="samples">{"".join(cards)}</div></section>
<section id="shard-problems"><h2>Shard problems ({len(totals.shard_problems)})</h2>
{shard_problems_html(totals)}</section>
<section id="rejects"><h2>Rejects ({rejected})</h2>{rejects_table(iter_rejects(out), rejected)}</section>
</body></html>
"""
    target = Path(to) if to else out / "report.html"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target


def _fresh(derived: Path, source: Path) -> bool:
    """Whether ``derived`` was written after the run last changed ``source``."""
    return derived.exists() and (not source.exists() or derived.stat().st_mtime >= source.stat().st_mtime)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=output_folder, help="output folder written by the engine")
    parser.add_argument("--samples", type=int, default=24, help="images shown (default: 24)")
    parser.add_argument("--to", type=Path, default=None, help="HTML file (default: OUT/report.html)")


def command(args: argparse.Namespace) -> int:
    path = build_report(args.out, samples=args.samples, to=args.to)
    print(f"report: {path} (open it in a browser; it needs no server)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="densefusion_local.py report", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))
