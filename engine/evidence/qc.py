"""Caption quality control: heuristic rules that catch what a caption engine gets wrong.

The paper (appendix D) cleans its captions "using heuristic rules to address issues such as
repetition and incompleteness". Each rule here looks at one caption and returns a verdict
with a short detail; :class:`QcConfig` says which rules run, their thresholds, and whether
a verdict drops the sample (recorded in ``rejects/`` as ``"<rule>: <detail>"``) or only
flags it (appended to ``sample.flags``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.evidence import language

if TYPE_CHECKING:  # the config's defaults come from here (QC_RULES, QC_SCAFFOLDING)
    from engine.core.config import QcConfig

QC_RULES = (
    "empty",  # nothing but whitespace
    "short",  # fewer words than a detailed caption can have
    "token_limit",  # the engine stopped at max_new_tokens (finish_reason "length")
    "unfinished",  # no sentence-final punctuation: cut off mid-sentence
    "repeated_ngrams",  # a decoding loop: a large share of the word n-grams are repeats
    "repeated_sentences",  # the same sentence written again and again
    "scaffolding",  # the prompt's structure leaked: coordinates, [OCR], "external information"
)

# What the fusion prompt shows the engine and a caption must never echo. Coordinates are the
# prompt's normalised boxes "[0.12, 0.34, ...]"; the bracketed headers and phrases are its
# section names and instructions (paper appendix C.2).
QC_SCAFFOLDING = (
    r"\[\s*[01]?\.\d+\s*,\s*[01]?\.\d+",
    r"\[\s*(?:ocr|world knowledge|detection box|external information|caption|image)\s*\]",
    r"external information",
    r"detection box",
    r"bounding box",
    r"world knowledge",
)

_SENTENCE_END = re.compile(r"[.!?。！？…][\"'”’)\]」』]*\s*$")


@dataclass(frozen=True)
class Verdict:
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}"


def words(text: str) -> list[str]:
    """Lower-cased words, split the way the statistics split them (engine/evidence/language.py)."""
    return [w.lower() for w in language.words(text)]


def ngram_repeat_share(tokens: list[str], n: int) -> float:
    """Share of the word n-grams that repeat an earlier n-gram (0: none, near 1: a loop)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def most_repeated_sentence(text: str) -> tuple[str, int]:
    sentences = [" ".join(words(s)) for s in language.sentences(text)]
    counts = Counter(s for s in sentences if s)
    if not counts:
        return "", 0
    return counts.most_common(1)[0]


def check_caption(text: str, finish_reason: str, cfg: QcConfig) -> list[Verdict]:
    """Every enabled rule the caption fails, in :data:`QC_RULES` order."""
    enabled = set(cfg.qc_rules)
    if not text.strip():
        # An empty caption fails every other rule too; one verdict says it all.
        return [Verdict("empty", "caption is empty")] if "empty" in enabled else []
    verdicts = []
    tokens = words(text)
    if "short" in enabled and len(tokens) < cfg.qc_min_words:
        verdicts.append(Verdict("short", f"{len(tokens)} words < {cfg.qc_min_words}"))
    if "token_limit" in enabled and finish_reason == "length":
        verdicts.append(Verdict("token_limit", "stopped at the output token limit"))
    if "unfinished" in enabled and not _SENTENCE_END.search(text):
        verdicts.append(Verdict("unfinished", f"ends mid-sentence: ...{text.rstrip()[-30:]!r}"))
    if "repeated_ngrams" in enabled:
        share = ngram_repeat_share(tokens, cfg.qc_ngram)
        if share > cfg.qc_max_ngram_repeat_share:
            verdicts.append(
                Verdict(
                    "repeated_ngrams",
                    f"{share:.0%} of {cfg.qc_ngram}-grams repeat "
                    f"(max {cfg.qc_max_ngram_repeat_share:.0%})",
                )
            )
    if "repeated_sentences" in enabled:
        sentence, count = most_repeated_sentence(text)
        if count > cfg.qc_max_sentence_repeats:
            verdicts.append(
                Verdict("repeated_sentences", f"{count}x {sentence[:40]!r}")
            )
    if "scaffolding" in enabled:
        for pattern in cfg.qc_scaffolding:
            match = re.search(pattern, text, re.IGNORECASE)
            if match:
                verdicts.append(Verdict("scaffolding", f"leaks {match.group(0)!r}"))
                break
    return verdicts
