"""Throughput figures of a caption engine: tokens/s, images/s, cache hits, GPU memory/util.

The caption stage feeds every batch's captions to :class:`CaptionTally`, lets a
:class:`GpuSampler` read NVML now and then, and reports ``tally.figures() | engine.metrics() |
sampler.figures()`` as its ``metrics()``, which the runtime merges into ``metrics.json``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from models.records import Caption


@dataclass
class CaptionTally:
    images: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0  # wall time spent inside generate()
    finish: Counter[str] = field(default_factory=Counter)

    def add(self, captions: list[Caption], seconds: float) -> None:
        self.images += len(captions)
        self.seconds += seconds
        for caption in captions:
            self.prompt_tokens += caption.prompt_tokens
            self.output_tokens += caption.output_tokens
            self.finish[caption.finish_reason] += 1

    def figures(self) -> dict[str, float]:
        figures = {f"finish_{reason}": float(n) for reason, n in self.finish.items()}
        if self.seconds > 0:
            figures.update(
                images_per_s=self.images / self.seconds,
                prompt_tokens_per_s=self.prompt_tokens / self.seconds,
                output_tokens_per_s=self.output_tokens / self.seconds,
            )
        if self.images:
            figures["output_tokens_per_image"] = self.output_tokens / self.images
            # the counts themselves: a live metrics endpoint serves them as counters
            figures.update(caption_images=float(self.images), caption_prompt_tokens=float(self.prompt_tokens),
                           caption_output_tokens=float(self.output_tokens))
        return figures


def gpu_figures() -> dict[str, float]:
    """Memory and utilisation of every visible GPU via NVML; empty without a GPU or pynvml."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    figures: dict[str, float] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            figures[f"gpu{i}_memory_used_gib"] = memory.used / 2**30
            figures[f"gpu{i}_util_percent"] = float(rates.gpu)
    except pynvml.NVMLError:
        pass  # figures are best effort: a GPU that stops answering must not stop the run
    finally:
        pynvml.nvmlShutdown()
    return figures


class GpuSampler:
    """Peak memory and mean utilisation per GPU, from NVML reads at most every ``every_s``."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last = float("-inf")
        self._peak: dict[str, float] = {}
        self._util_sum: dict[str, float] = {}
        self._reads = 0

    def maybe_sample(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        figures = gpu_figures()
        if not figures:
            return
        self._reads += 1
        for name, value in figures.items():
            if name.endswith("_memory_used_gib"):
                self._peak[name] = max(value, self._peak.get(name, 0.0))
            else:
                self._util_sum[name] = self._util_sum.get(name, 0.0) + value

    def figures(self) -> dict[str, float]:
        figures = {name.replace("_used_", "_peak_"): v for name, v in self._peak.items()}
        figures.update({name.replace("_util_", "_mean_util_"): total / self._reads
                        for name, total in self._util_sum.items()})
        return figures
