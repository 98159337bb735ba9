"""Evidence coverage scores (engine/evidence/coverage.py) for each caption, into ``sample.scores``."""

from __future__ import annotations

from engine.core.config import RunConfig, ScoreConfig
from engine.core.record import Sample
from engine.core.stage import Resources, Stage, run_per_sample
from engine.evidence.coverage import Evidence, coverage_scores
from engine.evidence.language import pos_tagger


def evidence(sample: Sample) -> Evidence:
    return Evidence(
        tags=tuple(t.name for t in sample.tags),
        box_labels=tuple(b.label for b in sample.boxes),
        ocr_lines=tuple(o.text for o in sample.ocr),
    )


def build(cfg: RunConfig) -> ScoreStage:
    return ScoreStage(cfg.score)


class ScoreStage(Stage):
    name = "score"

    def __init__(self, config: ScoreConfig):
        self.config = config
        self._tagger = None

    def resources(self) -> Resources:
        return Resources(batch_size=64)

    def setup(self) -> None:
        """Nothing up front: the tagger is loaded with the first caption (importing TextBlob
        costs seconds, which runs without captions, such as a probe-only pass, need not pay)."""

    def process(self, batch: list[Sample]) -> list[Sample]:
        return run_per_sample(self.name, batch, self._score)

    def _score(self, sample: Sample) -> None:
        if sample.caption is None or not sample.caption.text.strip():
            return  # nothing to score; quality control decides what an empty caption means
        if self._tagger is None:
            self._tagger = pos_tagger(self.config.pos_tagger)
        sample.scores.update(coverage_scores(sample.caption.text, evidence(sample), self._tagger))

    def teardown(self) -> None:
        self._tagger = None

    def describe(self) -> str:
        return f"score (coverage, POS tagger {self.config.pos_tagger})"
