"""Peak memory and time of ``stats``, ``report`` and ``export`` over a synthetic output of N shards
against the same over 50 × N shards in the same run (default 1,000 and 50,000, the issue's sizes;
~7 minutes on a loaded 2-core machine): the memory ratio says whether what the commands hold grows
with the output.

The outputs are written directly in the output contract (engine/io/writers.py's layout; no fsync,
no engine run): per shard a tar of ``--rows`` samples (the annotations JSON with a caption of
``--caption-words`` words, a fusion prompt of 300, tags, boxes, OCR, coverage and category
scores, and a small JPEG), a rejects parquet for one shard in four (the report shows the first
200 rejects), and a manifest line. Each command runs as the CLI runs it, in this process
(``stats`` with one worker, so all its work is measured here): ``stats``, then
``report`` (which finds stats.json fresh and reads the rest: totals, samples, rejects), then
``export jsonl`` (every image written). Peak memory is tracemalloc's: the Python heap the command
allocated beyond what was held before it, after a warm-up run on a tiny output (imports, the
tagger's lexicon); times are with tracemalloc on (it slows allocation-heavy code ~1.5-2x, both
sizes alike).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.captions import NOUNS, make_caption

MB = 1e6
COMMANDS = ("stats", "report", "export")


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def annotations(rng: random.Random, shard: str, key: str, words: int, prompt: str) -> dict:
    """A written sample's ``<key>.json``, as engine/core/record.py's Sample writes it."""
    from engine.core.record import Sample, Source
    from models.records import Box, Caption, OcrLine, Tag

    tags = rng.sample(NOUNS, 8)
    sample = Sample(key=key, source=Source(shard, f"/in/{shard}.tar", f"{key}.jpg"), width=640, height=480,
                    image_format="JPEG", alt_text=" ".join(rng.sample(NOUNS, 4)),
                    meta={"url": f"https://example.com/{shard}/{key}.jpg"},
                    tags=[Tag(t, round(rng.random(), 3)) for t in tags],
                    boxes=[Box(t, round(rng.random(), 3), (0.1, 0.2, 0.5, 0.6), "fused") for t in tags[:5]],
                    ocr=[OcrLine("GRAND OPENING", 0.98, (0.1, 0.1, 0.9, 0.3))],
                    scores={"cov_tags": rng.randint(0, 8) / 8, "cov_box_labels": rng.randint(0, 5) / 5,
                            "cov_ocr_lines": rng.choice((0.0, 1.0)), "unseen_nouns": rng.randint(0, 12),
                            "category:photo": round(rng.random(), 3)})
    sample.prompt = prompt
    caption = make_caption(rng, words, max(1, round(words / 17)))
    sample.caption = Caption(caption, 900, 260, rng.choice(("stop",) * 9 + ("length",)), 4.2, "llava-1.6-7b", "sglang")
    return sample.annotations()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_output(out: Path, shards: int, rows: int, words: int = 190, seed: int = 0) -> Path:
    """A synthetic output folder of ``shards`` shards of ``rows`` samples each, captions of ``words`` words."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.io.writers import REJECT_SCHEMA

    rng, image = random.Random(seed), _jpeg()
    # fusion prompts of their usual length, a few of them: making one per sample would take longer than the commands
    prompts = [make_caption(rng, words=300, sentence_count=15) for _ in range(16)]
    (out / "shards").mkdir(parents=True)
    (out / "rejects").mkdir()
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        for i in range(shards):
            shard = f"{i:05d}"
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for row in range(rows):
                    key = f"{shard}{row:04d}"
                    _add(tar, f"{key}.json", json.dumps(annotations(rng, shard, key, words, rng.choice(prompts))).encode())
                    _add(tar, f"{key}.jpg", image)
            # up to the end-of-archive blocks, without the padding to tarfile's 10 KiB record
            (out / "shards" / f"{shard}.tar").write_bytes(buffer.getvalue()[:tar.offset])
            rejected = int(i % 4 == 0)
            if rejected:
                reject = {"key": f"{shard}-bad", "shard": shard, "stage": "probe", "status": "filtered",
                          "reason": f"short edge {rng.randint(100, 447)} < 448"}
                pq.write_table(pa.Table.from_pylist([reject], schema=REJECT_SCHEMA),
                               out / "rejects" / f"{shard}.parquet")
            entry = {"shard": shard, "path": f"/in/{shard}.tar", "samples": rows + rejected, "attempt": 1,
                     "node": "node-0", "written": rows, "rejected": rejected,
                     "rejected_by_stage": {"probe": rejected} if rejected else {}, "errors": [],
                     "files": {f"shards/{shard}.tar": f"{rng.getrandbits(256):064x}"}}
            manifest.write(json.dumps(entry) + "\n")
    return out


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_mb: float


def measure(run: Callable[[], object]) -> Measured:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        run()
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return Measured(seconds, peak / MB)


def run_commands(out: Path, export_to: Path, samples: int) -> dict[str, Measured]:
    """The three commands over ``out``, each measured; checks that each read all ``samples``."""
    from engine.output.export import export
    from engine.output.report import build_report
    from engine.output.stats import output_stats

    figures = {"stats": measure(lambda: output_stats(out, workers=1)),
               "report": measure(lambda: build_report(out, samples=24)),
               "export": measure(lambda: export("jsonl", out, export_to))}
    counted = json.loads((out / "stats.json").read_text())["table1"]["samples"]
    with open(export_to / "densefusion.jsonl", encoding="utf-8") as handle:
        exported = sum(1 for _ in handle)
    if not counted == exported == samples:
        raise RuntimeError(f"{samples} samples written: stats counted {counted}, export wrote {exported}")
    return figures


def bench(sizes: tuple[int, ...], rows: int, words: int, workdir: Path) -> dict[int, dict[str, Measured]]:
    """Shard count → the commands' figures; a warm-up on 2 shards first (imports, lexicon)."""
    results = {}
    for shards in (2, *sizes):
        base = Path(tempfile.mkdtemp(prefix=f"outputs-{shards}-", dir=workdir))
        try:
            start = time.perf_counter()
            out = write_output(base / "out", shards, rows, words)
            made = time.perf_counter() - start
            figures = run_commands(out, base / "export", shards * rows)
            if shards != 2:
                results[shards] = figures
                print(f"  {shards:,} shards ({shards * rows:,} samples, written in {made:.0f} s): "
                      + ", ".join(f"{c} {m.seconds:.1f} s / {m.peak_mb:.2f} MB" for c, m in figures.items()),
                      flush=True)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    return results


def format_ratios(results: dict[int, dict[str, Measured]]) -> str:
    small, big = min(results), max(results)
    lines = [f"{'command':<8} {'time ' + format(small, ','):>14} {'time ' + format(big, ','):>14} {'ratio':>7}   "
             f"{'peak ' + format(small, ','):>14} {'peak ' + format(big, ','):>14} {'ratio':>7}"]
    for c in COMMANDS:
        a, b = results[small][c], results[big][c]
        lines.append(f"{c:<8} {a.seconds:>12.1f} s {b.seconds:>12.1f} s {b.seconds / a.seconds:>6.1f}x   "
                     f"{a.peak_mb:>11.2f} MB {b.peak_mb:>11.2f} MB {b.peak_mb / a.peak_mb:>6.2f}x")
    lines.append(f"({big // small}x the shards: time should grow {big // small}x, peak memory not at all)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench outputs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000, help="N: the small output's shards")
    parser.add_argument("--scale", type=int, default=50, help="the big output has N × this many shards")
    parser.add_argument("--rows", type=int, default=1, help="samples per shard")
    parser.add_argument("--caption-words", type=int, default=20,
                        help="words per caption (the paper's mean is 190: 10x the time of stats, the same memory)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the outputs are written (default: /dev/shm if there, else the temporary folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"stats, report, export over {args.shards:,} and {args.shards * args.scale:,} shards of {args.rows} "
          f"samples (captions of {args.caption_words} words); peak = tracemalloc's, times with it on")
    print(format_ratios(bench((args.shards, args.shards * args.scale), args.rows, args.caption_words, workdir)))
    return 0
