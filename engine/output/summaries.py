"""Mergeable streaming summaries: what ``stats`` keeps of a distribution, in memory bounded by a
constant whatever the number of samples or shards (a shard's summary merges into the output's).

:class:`Distribution` keeps counts per distinct value, so its mean, median, min, max and
histogram are exactly what the list of values gives, as long as it has seen at most
:data:`MAX_DISTINCT` distinct values: caption lengths and sentence counts are small integers, and
coverage scores are ratios of small counts, so an output of any size stays well under it. Past
it, values are counted in bins of a power-of-two width (``width``): the median and the histogram's
counts are then within a bin of the exact figures (said in the output), while the count, mean,
min and max stay exact. :class:`FrequentCounts` keeps the most frequent values of an open-ended
set (reject reasons, which may name a key) with the Misra-Gries summary: exact until it has seen
2 × ``keep`` distinct values, then each count is low by at most ``undercount``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_DISTINCT = 4096
HISTOGRAM_BINS = 20


@dataclass
class Distribution:
    """Counts per value (per bin of ``width`` once binned); exact count, sum, min and max."""

    counts: Counter = field(default_factory=Counter)  # value, or a bin's lower edge, → count
    n: int = 0
    total: float = 0  # an int while every value is one
    low: float = math.inf
    high: float = -math.inf
    width: float = 0.0  # 0: every value kept as it is

    def add(self, value: float, count: int = 1) -> None:
        self.n += count
        self.total += value * count
        self.low, self.high = min(self.low, value), max(self.high, value)
        self.counts[self._bin(value)] += count
        if len(self.counts) > MAX_DISTINCT:
            self._coarsen(self.width)

    def merge(self, other: Distribution) -> Distribution:
        self.n += other.n
        self.total += other.total
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        if other.width > self.width:
            self._rebin(other.width)
        for value, count in other.counts.items():
            self.counts[self._bin(value)] += count
        if len(self.counts) > MAX_DISTINCT:
            self._coarsen(self.width)
        return self

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def _bin(self, value: float) -> float:
        # power-of-two widths nest: a value's bin at 2w is its bin at w's bin at 2w, exactly in floating point
        return math.floor(value / self.width) * self.width if self.width else value

    def _rebin(self, width: float) -> None:
        self.width = width
        old, self.counts = self.counts, Counter()
        for value, count in old.items():
            self.counts[self._bin(value)] += count

    def _coarsen(self, width: float) -> None:
        width = width * 2 if width else 2.0 ** math.ceil(math.log2((self.high - self.low) / MAX_DISTINCT))
        self._rebin(width)
        if len(self.counts) > MAX_DISTINCT:
            self._coarsen(width)

    def _values(self) -> tuple[list[float], list[int]]:
        """The values in order with their counts; a bin stands for its middle (within the range seen)."""
        values = sorted(self.counts)
        if self.width:
            return [(max(v, self.low) + min(v + self.width, self.high)) / 2 for v in values], \
                   [self.counts[v] for v in values]
        return values, [self.counts[v] for v in values]

    def median(self) -> float:
        values, counts = self._values()
        cumulative = np.cumsum(counts)
        lower, upper = (values[int(np.searchsorted(cumulative, rank, side="right"))]
                        for rank in ((self.n - 1) // 2, self.n // 2))
        return (lower + upper) / 2

    def summary(self) -> dict[str, Any]:
        """Samples, mean, median, min, max; ``median_within`` says how far the median may be
        from the exact one once values are binned."""
        out = {"samples": self.n, "mean": float(self.mean), "median": float(self.median()),
               "min": float(self.low), "max": float(self.high)}
        if self.width:
            out["median_within"] = self.width / 2
        return out

    def histogram(self, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
        """At most ``bins`` equal bins over [min, max] (fewer when there are fewer distinct
        values), as numpy.histogram of the values; ``approximate_within`` once values are binned:
        a value within that distance of an edge may be counted in the bin beside."""
        if not self.n:
            return {"edges": [], "counts": []}
        values, weights = self._values()
        counts, edges = np.histogram(values, bins=min(bins, len(values)), range=(self.low, self.high),
                                     weights=weights)
        out = {"edges": [round(float(e), 2) for e in edges], "counts": [int(c) for c in counts]}
        if self.width:
            out["approximate_within"] = self.width
        return out


@dataclass
class FrequentCounts:
    """The most frequent values and their counts in at most 2 × ``keep`` entries (Misra-Gries:
    mergeable; a count is low by at most ``undercount``, which stays 0 until 2 × ``keep``
    distinct values were seen, and at most a ``keep + 1``-th of all that was counted)."""

    keep: int = 1000
    counts: Counter = field(default_factory=Counter)
    undercount: int = 0

    def add(self, value: Any, count: int = 1) -> None:
        self.counts[value] += count
        if len(self.counts) > 2 * self.keep:
            self._compact()

    def merge(self, other: FrequentCounts) -> FrequentCounts:
        self.undercount += other.undercount
        for value, count in other.counts.items():
            self.add(value, count)
        return self

    def most_common(self, n: int) -> dict[Any, int]:
        return dict(self.counts.most_common(n))

    def _compact(self) -> None:
        # every value loses the (keep+1)-th largest count: at least keep+1 values lose it each time
        cut = sorted(self.counts.values(), reverse=True)[self.keep]
        self.counts = Counter({v: c - cut for v, c in self.counts.items() if c > cut})
        self.undercount += cut
