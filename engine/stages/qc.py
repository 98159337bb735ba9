"""Quality-control stage: runs :mod:`engine.evidence.qc` on each caption, then drops or flags."""

from __future__ import annotations

from collections import Counter

from engine.core.config import QcConfig, RunConfig
from engine.core.record import Sample
from engine.core.stage import Resources, Stage
from engine.evidence.qc import check_caption


def build(cfg: RunConfig) -> QualityControl:
    return QualityControl(cfg.qc.for_models(cfg.runtime.models))


class QualityControl(Stage):
    name = "qc"

    def __init__(self, cfg: QcConfig):
        self.cfg = cfg
        self._dropped: Counter[str] = Counter()
        self._flagged: Counter[str] = Counter()

    def resources(self) -> Resources:
        return Resources(batch_size=64)

    def process(self, batch: list[Sample]) -> list[Sample]:
        for sample in batch:
            if sample.caption is not None:  # None: the caption stage was not part of this run
                self._judge(sample)
        return batch

    def _judge(self, sample: Sample) -> None:
        verdicts = check_caption(sample.caption.text, sample.caption.finish_reason, self.cfg)
        for verdict in verdicts:
            if self.cfg.drops(verdict.rule):
                # The first dropping rule names the reject; later ones would only repeat it.
                self._dropped[verdict.rule] += 1
                sample.filter(self.name, str(verdict))
                return
        for verdict in verdicts:
            self._flagged[verdict.rule] += 1
            sample.flags.append(str(verdict))

    def metrics(self) -> dict[str, float]:
        figures = {f"dropped_{rule}": float(n) for rule, n in self._dropped.items()}
        figures.update({f"flagged_{rule}": float(n) for rule, n in self._flagged.items()})
        return figures

    def describe(self) -> str:
        return f"qc ({self.cfg.qc_action}: {', '.join(self.cfg.qc_rules)})"
