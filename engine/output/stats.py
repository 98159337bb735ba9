"""The paper's Table 1 for any output folder, plus length histograms, coverage and categories.

Table 1 columns: samples; mean characters, words and sentences per caption; share of nouns,
adjectives, adverbs, verbs and numerals among all caption words (pooled over the dataset,
the paper's "lexical composition"). Words, sentences and parts of speech are defined in
engine/evidence/language.py. Only samples with a non-empty caption count towards the caption figures.

    python densefusion_local.py stats OUT [--pos-tagger pattern|spacy[:model]] [--workers N]

writes OUT/stats.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.figures import OutputTotals
from engine.evidence.category import category_of
from engine.evidence.coverage import COVERAGE_SCORES
from engine.evidence.language import POS_CLASSES, PosTagger, check_pos_tagger, pos_tagger, sentences, tagged_words
from engine.io.manifest import Manifest, write_json_atomic
from engine.output.dataset_reader import iter_rejects, iter_tar, read_json, shard_tars, tiny_model_runs

HISTOGRAM_BINS = 20
CAPTIONS_PER_WORKER = 1000
POS_COLUMNS = {"noun": "nouns", "adjective": "adjectives", "adverb": "adverbs", "verb": "verbs",
               "numeral": "numerals"}


@dataclass
class CaptionCounts:
    chars: list[int] = field(default_factory=list)
    words: list[int] = field(default_factory=list)
    sentences: list[int] = field(default_factory=list)
    pos: Counter = field(default_factory=Counter)

    def add(self, caption: str, tagger: PosTagger) -> None:
        tagged = tagged_words(caption, tagger)
        self.chars.append(len(caption))
        self.words.append(len(tagged))
        self.sentences.append(len(sentences(caption)))
        self.pos.update(cls for _, cls in tagged)


def table1(counts: CaptionCounts, samples: int) -> dict[str, Any]:
    n, total_words = len(counts.words), sum(counts.words)
    row: dict[str, Any] = {
        "samples": samples,
        "captions": n,
        "chars": float(np.mean(counts.chars)) if n else 0.0,
        "words": float(np.mean(counts.words)) if n else 0.0,
        "sentences": float(np.mean(counts.sentences)) if n else 0.0,
    }
    for cls in POS_CLASSES:
        row[POS_COLUMNS[cls]] = counts.pos[cls] / total_words if total_words else 0.0
    return row


def histogram(values: list[int], bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=min(bins, max(1, len(set(values)))))
    return {"edges": [round(float(e), 2) for e in edges], "counts": [int(c) for c in counts]}


def summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"samples": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
            "min": float(a.min()), "max": float(a.max())}


@dataclass
class Tally:
    """Everything the statistics count, for any set of samples; tallies of shards merge."""

    samples: int = 0
    captions: CaptionCounts = field(default_factory=CaptionCounts)
    scores: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in COVERAGE_SCORES})
    categories: Counter = field(default_factory=Counter)
    finish: Counter = field(default_factory=Counter)

    def add(self, ann: dict[str, Any], tagger: PosTagger) -> None:
        self.samples += 1
        caption = (ann.get("caption") or "").strip()
        if caption:
            self.captions.add(caption, tagger)
        scores = ann.get("scores") or {}
        for name, value in scores.items():
            if name in self.scores:
                self.scores[name].append(value)
        category = category_of(scores)
        if category:
            self.categories[category] += 1
        if ann.get("engine"):
            self.finish[ann["engine"].get("finish_reason", "")] += 1

    def merge(self, other: Tally) -> Tally:
        self.samples += other.samples
        for name in ("chars", "words", "sentences"):
            getattr(self.captions, name).extend(getattr(other.captions, name))
        self.captions.pos.update(other.captions.pos)
        for name, values in other.scores.items():
            self.scores[name].extend(values)
        self.categories.update(other.categories)
        self.finish.update(other.finish)
        return self


def summarise(tally: Tally, rejects: Iterable[dict[str, Any]], tagger_name: str) -> dict[str, Any]:
    """The statistics; ``rejects`` is read once, as a stream."""
    counts = tally.captions
    by_stage, by_reason = Counter(), Counter()
    for reject in rejects:
        by_stage[reject.get("stage", "")] += 1
        by_reason[reject.get("reason", "")] += 1
    return {
        "table1": table1(counts, tally.samples),
        "pos_tagger": tagger_name,
        "histograms": {"chars": histogram(counts.chars), "words": histogram(counts.words),
                       "sentences": histogram(counts.sentences)},
        "coverage": {name: summary(v) for name, v in tally.scores.items() if v},
        "categories": dict(tally.categories.most_common()),
        "finish_reasons": dict(tally.finish.most_common()),
        "rejects": {"total": by_stage.total(), "by_stage": dict(by_stage.most_common()),
                    "by_reason": dict(by_reason.most_common(20))},
    }


def compute_stats(annotations: Iterable[dict[str, Any]], rejects: Iterable[dict[str, Any]],
                  tagger: PosTagger) -> dict[str, Any]:
    tally = Tally()
    for ann in annotations:
        tally.add(ann, tagger)
    return summarise(tally, rejects, tagger.name)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def tally_shard(tar_path: Path, tagger_name: str) -> Tally:
    """One shard's tally; a top-level function so worker processes can run it."""
    tagger, tally = pos_tagger(tagger_name), Tally()
    for sample in iter_tar(tar_path):
        tally.add(sample.annotations, tagger)
    return tally


def output_stats(out: Path, tagger_name: str = "pattern", workers: int = 1) -> dict[str, Any]:
    """Statistics of an output folder, also written to OUT/stats.json. Part-of-speech tagging is
    pure Python (~300 captions/s per core), so shards are spread over ``workers`` processes."""
    out = Path(out)
    check_pos_tagger(tagger_name)  # a bad tagger name fails here, not in a worker
    tars = shard_tars(out)
    tally = Tally()
    # A worker costs seconds to start (importing TextBlob), the time of ~1,000 captions.
    written = OutputTotals.of(Manifest(out)).written
    workers = min(workers, len(tars), max(1, written // CAPTIONS_PER_WORKER))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for part in pool.map(tally_shard, tars, [tagger_name] * len(tars)):
                tally.merge(part)
    else:
        for tar in tars:
            tally.merge(tally_shard(tar, tagger_name))
    stats = summarise(tally, iter_rejects(out), tagger_name)
    write_json_atomic(out / "stats.json", stats)
    return stats


# Said beside Table 1 when a run into the output used --models tiny (metrics.json records it).
TINY_TABLE1_NOTE = "Tiny models write noise: comparing these figures with the paper's rows means nothing."
TABLE1_HEADER = ("Dataset", "Samples", "Char.", "Word", "Sen.", "Nouns", "Adj.", "Adv.", "Verb.", "Num.")
# The paper's own rows (Table 1), printed under ours for comparison.
PAPER_ROWS = (
    ("DenseFusion-4V-100K", "100K", "1253", "206", "11.2", "27.9%", "10.9%", "1.8%", "12.0%", "0.83%"),
    ("DenseFusion-1M", "1059K", "1130", "191", "11.0", "28.0%", "10.6%", "1.4%", "12.0%", "0.85%"),
)


def table1_row(stats: dict[str, Any]) -> tuple[str, ...]:
    """Table 1's cells, rounded as the paper prints them."""
    t = stats["table1"]
    return ("this output", str(t["samples"]), f"{t['chars']:.0f}", f"{t['words']:.0f}", f"{t['sentences']:.1f}",
            *(f"{100 * t[POS_COLUMNS[c]]:.1f}%" for c in POS_CLASSES))


def format_table1(stats: dict[str, Any]) -> str:
    t = stats["table1"]
    rows = (TABLE1_HEADER, table1_row(stats), *PAPER_ROWS)
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE1_HEADER))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.append(f"({t['captions']} captions; parts of speech by the {stats['pos_tagger']} tagger; "
                 f"the last {len(PAPER_ROWS)} rows are the paper's)")
    if stats["coverage"]:
        lines.append("evidence coverage (mean over samples where defined):")
        lines += [f"  {name:<18} {s['mean']:.3f}  ({s['samples']} samples)"
                  for name, s in stats["coverage"].items()]
    if stats["categories"]:
        lines.append("categories: " + ", ".join(f"{k} {v}" for k, v in stats["categories"].items()))
    if stats["rejects"]["total"]:
        lines.append(f"rejects: {stats['rejects']['total']} (" + ", ".join(
            f"{k or '?'} {v}" for k, v in stats["rejects"]["by_stage"].items()) + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="densefusion_local.py stats", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return command(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder written by the engine")
    parser.add_argument("--pos-tagger", default="pattern",
                        help="pattern (built in, offline) or spacy[:model] (default: pattern)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes tagging shards in parallel (default: CPU cores, at most 8)")
    parser.add_argument("--json", action="store_true", help="print stats.json instead of the table")


def command(args: argparse.Namespace) -> int:
    stats = output_stats(args.out, args.pos_tagger, args.workers)
    print(json.dumps(stats, indent=2) if args.json else format_table1(stats))
    if not args.json and tiny_model_runs(read_json(args.out / "metrics.json")):
        print(f"note: {TINY_TABLE1_NOTE}")
    print(f"written: {args.out / 'stats.json'}")
    return 0
