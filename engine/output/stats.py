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
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.core.figures import OutputTotals
from engine.evidence.category import category_of
from engine.evidence.coverage import COVERAGE_SCORES
from engine.evidence.language import POS_CLASSES, PosTagger, check_pos_tagger, pos_tagger, sentences, tagged_words
from engine.io.manifest import Manifest, write_json_atomic
from engine.io.object_output import output_folder
from engine.output.dataset_reader import iter_rejects, iter_tar, read_json, shard_tars, tiny_model_runs
from engine.output.summaries import Distribution, FrequentCounts

CAPTIONS_PER_WORKER = 1000
POS_COLUMNS = {"noun": "nouns", "adjective": "adjectives", "adverb": "adverbs", "verb": "verbs",
               "numeral": "numerals"}
REASONS_SHOWN = 20


@dataclass
class CaptionCounts:
    chars: Distribution = field(default_factory=Distribution)
    words: Distribution = field(default_factory=Distribution)
    sentences: Distribution = field(default_factory=Distribution)
    pos: Counter = field(default_factory=Counter)

    def add(self, caption: str, tagger: PosTagger) -> None:
        tagged = tagged_words(caption, tagger)
        self.chars.add(len(caption))
        self.words.add(len(tagged))
        self.sentences.add(len(sentences(caption)))
        self.pos.update(cls for _, cls in tagged)

    def merge(self, other: CaptionCounts) -> None:
        for name in ("chars", "words", "sentences"):
            getattr(self, name).merge(getattr(other, name))
        self.pos.update(other.pos)


def table1(counts: CaptionCounts, samples: int) -> dict[str, Any]:
    total_words = counts.words.total
    row: dict[str, Any] = {
        "samples": samples,
        "captions": counts.words.n,
        "chars": float(counts.chars.mean),
        "words": float(counts.words.mean),
        "sentences": float(counts.sentences.mean),
    }
    for cls in POS_CLASSES:
        row[POS_COLUMNS[cls]] = counts.pos[cls] / total_words if total_words else 0.0
    return row


@dataclass
class Tally:
    """Everything the statistics count, for any set of samples, in memory bounded whatever their
    number (engine/output/summaries.py); tallies of shards merge."""

    samples: int = 0
    captions: CaptionCounts = field(default_factory=CaptionCounts)
    scores: dict[str, Distribution] = field(default_factory=lambda: {name: Distribution() for name in COVERAGE_SCORES})
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
                self.scores[name].add(value)
        category = category_of(scores)
        if category:
            self.categories[category] += 1
        if ann.get("engine"):
            self.finish[ann["engine"].get("finish_reason", "")] += 1

    def merge(self, other: Tally) -> Tally:
        self.samples += other.samples
        self.captions.merge(other.captions)
        for name, values in other.scores.items():
            self.scores[name].merge(values)
        self.categories.update(other.categories)
        self.finish.update(other.finish)
        return self


def summarise(tally: Tally, rejects: Iterable[dict[str, Any]], tagger_name: str) -> dict[str, Any]:
    """The statistics; ``rejects`` is read once, as a stream. Reasons are open-ended (some name a
    key or a member): ``by_reason`` holds the most frequent, and ``by_reason_undercount`` (only
    when it is not 0) how much each of those counts may be low."""
    counts = tally.captions
    by_stage, by_reason = Counter(), FrequentCounts()
    for reject in rejects:
        by_stage[reject.get("stage", "")] += 1
        by_reason.add(reject.get("reason", ""))
    rejects_figures = {"total": by_stage.total(), "by_stage": dict(by_stage.most_common()),
                       "by_reason": by_reason.most_common(REASONS_SHOWN)}
    if by_reason.undercount:
        rejects_figures["by_reason_undercount"] = by_reason.undercount
    return {
        "table1": table1(counts, tally.samples),
        "pos_tagger": tagger_name,
        "histograms": {"chars": counts.chars.histogram(), "words": counts.words.histogram(),
                       "sentences": counts.sentences.histogram()},
        "coverage": {name: values.summary() for name, values in tally.scores.items() if values.n},
        "categories": dict(tally.categories.most_common()),
        "finish_reasons": dict(tally.finish.most_common()),
        "rejects": rejects_figures,
    }


def compute_stats(annotations: Iterable[dict[str, Any]], rejects: Iterable[dict[str, Any]],
                  tagger: PosTagger) -> dict[str, Any]:
    tally = Tally()
    for ann in annotations:
        tally.add(ann, tagger)
    return summarise(tally, rejects, tagger.name)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@lru_cache(maxsize=1)
def shard_tagger(name: str) -> PosTagger:
    """One tagger per process for all its shards (a spaCy pipeline takes a second to load)."""
    return pos_tagger(name)


def tally_shard(tar_path: str, tagger_name: str) -> Tally:
    """One shard's tally; a top-level function so worker processes can run it."""
    tagger, tally = shard_tagger(tagger_name), Tally()
    for sample in iter_tar(tar_path):
        tally.add(sample.annotations, tagger)
    return tally


def shard_tallies(tars: Iterable[str], tagger_name: str, workers: int) -> Iterator[Tally]:
    """Each shard's tally, in the shards' order; with ``workers`` processes, at most two shards
    per worker are handed out ahead of the merge, so memory stays bounded however many shards."""
    if workers <= 1:
        yield from (tally_shard(tar, tagger_name) for tar in tars)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        ahead: deque = deque()
        for tar in tars:
            ahead.append(pool.submit(tally_shard, tar, tagger_name))
            if len(ahead) >= 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def output_stats(out: Path, tagger_name: str = "pattern", workers: int = 1) -> dict[str, Any]:
    """Statistics of an output folder, also written to OUT/stats.json. Part-of-speech tagging is
    pure Python (~300 captions/s per core), so shards are spread over ``workers`` processes.
    Shards are read one at a time and merged into one :class:`Tally`: memory does not grow with
    the output."""
    out = Path(out)
    check_pos_tagger(tagger_name)  # a bad tagger name fails here, not in a worker
    tars = shard_tars(out)
    # A worker costs seconds to start (importing TextBlob), the time of ~1,000 captions.
    totals = OutputTotals.of(Manifest(out))
    workers = min(workers, totals.shards, max(1, totals.written // CAPTIONS_PER_WORKER))
    tally = Tally()
    for part in shard_tallies(tars, tagger_name, workers):
        tally.merge(part)
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
    parser.add_argument("out", type=output_folder, help="output folder written by the engine")
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
