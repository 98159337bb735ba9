"""The paper's Table 1 for any output folder, plus length histograms, coverage and categories.

Table 1 columns: samples; mean characters, words and sentences per caption; share of nouns,
adjectives, adverbs, verbs and numerals among all caption words (pooled over the dataset,
the paper's "lexical composition"). Words, sentences and parts of speech are defined in
engine/language.py. Only samples with a non-empty caption count towards the caption figures.

    python densefusion_local.py stats OUT [--pos-tagger pattern|spacy[:model]]

writes OUT/stats.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.category import category_of
from engine.coverage import COVERAGE_SCORES
from engine.dataset_reader import iter_samples, read_rejects
from engine.language import POS_CLASSES, PosTagger, pos_tagger, sentences, tagged_words
from engine.manifest import write_json_atomic

HISTOGRAM_BINS = 20
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


def compute_stats(annotations: Iterable[dict[str, Any]], rejects: list[dict[str, Any]],
                  tagger: PosTagger) -> dict[str, Any]:
    counts = CaptionCounts()
    scores: dict[str, list[float]] = {name: [] for name in COVERAGE_SCORES}
    categories: Counter = Counter()
    finish: Counter = Counter()
    samples = 0
    for ann in annotations:
        samples += 1
        caption = (ann.get("caption") or "").strip()
        if caption:
            counts.add(caption, tagger)
        for name, value in (ann.get("scores") or {}).items():
            if name in scores:
                scores[name].append(value)
        category = category_of(ann.get("scores") or {})
        if category:
            categories[category] += 1
        if ann.get("engine"):
            finish[ann["engine"].get("finish_reason", "")] += 1
    return {
        "table1": table1(counts, samples),
        "pos_tagger": tagger.name,
        "histograms": {"chars": histogram(counts.chars), "words": histogram(counts.words),
                       "sentences": histogram(counts.sentences)},
        "coverage": {name: summary(v) for name, v in scores.items() if v},
        "categories": dict(categories.most_common()),
        "finish_reasons": dict(finish.most_common()),
        "rejects": {"total": len(rejects),
                    "by_stage": dict(Counter(r.get("stage", "") for r in rejects).most_common()),
                    "by_reason": dict(Counter(r.get("reason", "") for r in rejects).most_common(20))},
    }


def output_stats(out: Path, tagger_name: str = "pattern") -> dict[str, Any]:
    """Statistics of an output folder, also written to OUT/stats.json."""
    out = Path(out)
    stats = compute_stats((s.annotations for s in iter_samples(out)), read_rejects(out),
                          pos_tagger(tagger_name))
    write_json_atomic(out / "stats.json", stats)
    return stats


def format_table1(stats: dict[str, Any]) -> str:
    t = stats["table1"]
    header = ("Samples", "Char.", "Word", "Sen.", "Nouns", "Adj.", "Adv.", "Verb.", "Num.")
    values = (
        str(t["samples"]), f"{t['chars']:.0f}", f"{t['words']:.0f}", f"{t['sentences']:.1f}",
        *(f"{100 * t[POS_COLUMNS[c]]:.1f}%" for c in POS_CLASSES),
    )
    widths = [max(len(h), len(v)) for h, v in zip(header, values)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join(v.rjust(w) for v, w in zip(values, widths))]
    lines.append(f"({t['captions']} captions; parts of speech by the {stats['pos_tagger']} tagger)")
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
    parser = argparse.ArgumentParser(prog="densefusion_local.py stats", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return command(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder written by the engine")
    parser.add_argument("--pos-tagger", default="pattern",
                        help="pattern (built in, offline) or spacy[:model] (default: pattern)")
    parser.add_argument("--json", action="store_true", help="print stats.json instead of the table")


def command(args: argparse.Namespace) -> int:
    stats = output_stats(args.out, args.pos_tagger)
    print(json.dumps(stats, indent=2) if args.json else format_table1(stats))
    print(f"written: {args.out / 'stats.json'}")
    return 0
