"""Prompt stage: the experts' outputs on each sample written into the fusion prompt."""

from __future__ import annotations

from engine.core.config import RunConfig
from engine.core.record import Sample
from engine.core.stage import Resources, Stage, run_per_sample
from engine.evidence.prompt import PromptConfig, sample_prompt


def build(cfg: RunConfig) -> FusionPrompt:
    return FusionPrompt(cfg.prompt)


class FusionPrompt(Stage):
    name = "prompt"

    def __init__(self, config: PromptConfig):
        self.config = config

    def resources(self) -> Resources:
        return Resources(batch_size=64)

    def process(self, batch: list[Sample]) -> list[Sample]:
        def fill(sample: Sample) -> None:
            sample.prompt = sample_prompt(sample, self.config)

        return run_per_sample(self.name, batch, fill)

    def describe(self) -> str:
        return f"{self.name} ({self.config.prompt_template} template)"
