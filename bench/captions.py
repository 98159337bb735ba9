"""The text side on ~190-word captions (Table 1 counts, coverage scores, the stats command):
captions/s against str.split()/regex counting and a plain substring test.

Builds deterministic captions of the paper's length (190 words, 11 sentences) with tags, boxes
and OCR lines, then measures in the same run, per core:
  baseline counts   str.split() words + a regex sentence split (what ad-hoc scripts do)
  table 1 counts    the engine's tokens, sentences and parts of speech (pattern tagger)
  baseline names    label substring test (``label in caption.lower()``), no plural/synonym/POS
  coverage scores   all evidence coverage scores of engine/evidence/coverage.py
  stats command     OUT/stats.json from a two-shard output folder (one worker)
and prints captions/s, the ratios, and what 1M captions (DenseFusion-1M) would take.
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
import time
from pathlib import Path

from engine.evidence.coverage import Evidence, coverage_scores
from engine.evidence.language import pos_tagger, sentences, tagged_words

NOUNS = "dog cat person car tree road sky building window table chair cup sign poster bottle lamp".split()
ADJECTIVES = "red large small wooden bright dark old modern round striped".split()
VERBS = "sits stands rests leans hangs shows reads covers".split()
ADVERBS = "quietly slightly neatly prominently".split()


def make_caption(rng: random.Random, words: int = 190, sentence_count: int = 11) -> str:
    out: list[str] = []
    per = round(words / sentence_count)
    for _ in range(sentence_count):
        parts = ["A", rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(ADVERBS),
                 "near", str(rng.randint(2, 9)), rng.choice(NOUNS) + "s"]
        while len(parts) < per:
            parts += ["and", "the", rng.choice(ADJECTIVES), rng.choice(NOUNS)]
        out.append(" ".join(parts[:per]) + ".")
    return " ".join(out)


def make_evidence(rng: random.Random) -> Evidence:
    return Evidence(tags=tuple(rng.sample(NOUNS, 8)), box_labels=tuple(rng.sample(NOUNS, 5)),
                    ocr_lines=("GRAND OPENING", "OPEN 24 HOURS"))


def rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


_SENTENCE = re.compile(r"[.!?]+\s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench captions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=300, help="captions measured per row (default: %(default)s)")
    args = parser.parse_args(argv)

    rng = random.Random(0)
    captions = [make_caption(rng) for _ in range(args.captions)]
    evidence = [make_evidence(rng) for _ in captions]
    start = time.perf_counter()
    tagger = pos_tagger("pattern")
    tagged_words(captions[0], tagger)  # load the lexicon outside the timings
    load_s = time.perf_counter() - start

    baseline_counts = rate(lambda c: (len(c.split()), len(_SENTENCE.split(c))), captions)
    table1 = rate(lambda c: (tagged_words(c, tagger), sentences(c)), captions)
    pairs = list(zip(captions, evidence))
    baseline_names = rate(lambda p: [label in p[0].lower() for label in p[1].tags + p[1].box_labels], pairs)
    coverage = rate(lambda p: coverage_scores(p[0], p[1], tagger), pairs)

    print(f"{len(captions)} captions of {len(captions[0].split())} words, {len(sentences(captions[0]))} sentences")
    print(f"  baseline counts   {baseline_counts:10.0f} captions/s")
    print(f"  table 1 counts    {table1:10.0f} captions/s  ({baseline_counts / table1:.0f}x the baseline's cost: POS tagging)")
    print(f"  baseline names    {baseline_names:10.0f} captions/s")
    print(f"  coverage scores   {coverage:10.0f} captions/s  ({baseline_names / coverage:.0f}x the baseline's cost)")
    print(f"  1M captions, one core: table 1 {1e6 / table1 / 60:.0f} min, coverage {1e6 / coverage / 60:.0f} min")
    print(f"  loading the pattern tagger: {load_s:.1f} s (once per process; stats --workers pays it per worker)")

    with tempfile.TemporaryDirectory() as tmp:
        out = write_output(Path(tmp) / "out", captions, evidence)
        from engine.output.stats import output_stats

        start = time.perf_counter()
        output_stats(out, workers=1)
        seconds = time.perf_counter() - start
        print(f"  stats command     {len(captions) / seconds:10.0f} captions/s (reading the tars included)")
    return 0


def write_output(out: Path, captions: list[str], evidence: list[Evidence]) -> Path:
    """Two shards through the engine's own writer (1x1 JPEGs: the text is what is measured)."""
    import io

    from PIL import Image

    from engine.core.record import Sample, ShardEnd, Source
    from engine.io.manifest import Manifest
    from engine.io.writers import DatasetWriter
    from models.records import Caption, Tag

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "JPEG")
    writer = DatasetWriter(out, Manifest(out))
    half = len(captions) // 2
    for shard, part in (("a", range(half)), ("b", range(half, len(captions)))):
        for i in part:
            sample = Sample(key=f"{i:06d}", source=Source(shard, shard, str(i)), image_bytes=buffer.getvalue(),
                            tags=[Tag(t, 1.0) for t in evidence[i].tags])
            sample.caption = Caption(captions[i], 0, 0, "stop", 0.0, "bench", "bench")
            writer.write(sample)
        writer.commit(ShardEnd(shard, shard, len(part)))
    return out
