"""An expert stage wrapped in the expert cache (engine/io/expert_cache.py): hits skip the expert.

Not a stage of its own: the tag and detect factories, and ``Expert.build`` (engine/stages/expert.py),
wrap their stage with :func:`cached`.
Hits and misses reach ``metrics.json`` (the stage's entry) and the progress bar, so a run
served from the cache says why its experts ran at thousands of images/s.
"""

from __future__ import annotations

from pathlib import Path

from engine.core.config import RunConfig
from engine.core.record import Sample
from engine.core.registry import evidence_kinds
from engine.core.stage import ImageView, Resources, Stage
from engine.io.expert_cache import ExpertCache, image_digest, output_fingerprint


def cache_path(cfg: RunConfig) -> Path | None:
    setting = cfg.experts.expert_cache
    if setting == "off":
        return None
    return Path(setting) if setting else Path(cfg.runtime.cache_dir) / "experts.sqlite"


def cached(stage: Stage, cfg: RunConfig, output: str) -> Stage:
    """``stage`` (which fills the evidence kind ``output``) behind the expert cache, unless it is off."""
    path = cache_path(cfg)
    return stage if path is None else CachedExpert(stage, path, output_fingerprint(cfg, output), (output,))


class CachedExpert(Stage):
    """``inner`` with its ``fields`` read from / written to the cache, keyed per image."""

    def __init__(self, inner: Stage, cache_path: Path, expert_fingerprint: str, fields: tuple[str, ...]):
        kinds = evidence_kinds()
        unknown = set(fields) - set(kinds)
        if unknown:
            raise ValueError(f"cannot cache {sorted(unknown)}: not evidence kinds (engine/core/registry.py)")
        self.kinds = [kinds[name] for name in fields]
        self.inner = inner
        self.name = inner.name
        self.cache_path = Path(cache_path)
        self.expert = expert_fingerprint
        self.fields = fields
        self.cache: ExpertCache | None = None
        self.inner_ready = False
        self.hits = self.misses = 0

    def resources(self) -> Resources:
        return self.inner.resources()

    def views(self) -> tuple[ImageView, ...]:
        return self.inner.views()

    def setup(self) -> None:
        self.cache = ExpertCache(self.cache_path)  # opened in the worker thread that uses it

    def process(self, batch: list[Sample]) -> list[Sample]:
        keyed = {id(s): image_digest(s) for s in batch if s.image_bytes}
        found = self.cache.get_many(sorted(set(keyed.values())), self.expert)
        misses = []
        for sample in batch:
            payload = found.get(keyed.get(id(sample), ""))
            if payload is None:
                misses.append(sample)
                continue
            for kind in self.kinds:
                sample.put(kind.name, kind.decode(payload[kind.name]))
            for view in self.inner.views():
                sample.views.pop(view.name, None)  # the expert would have consumed it
            self.hits += 1
        self.misses += len(misses)
        if misses:
            if not self.inner_ready:
                self.inner.setup()
                self.inner_ready = True
            self.inner.process(misses)
            fresh = {
                keyed[id(s)]: {kind.name: kind.encode(s.get(kind.name)) for kind in self.kinds}
                for s in misses if s.alive and id(s) in keyed
            }
            if fresh:
                self.cache.put_many(fresh, self.expert)
        return batch

    def teardown(self) -> None:
        if self.inner_ready:
            self.inner.teardown()
        if self.cache is not None:
            self.cache.close()

    def describe(self) -> str:
        return f"{self.inner.describe()} [expert cache {self.cache_path}]"

    def metrics(self) -> dict[str, float]:
        inner = getattr(self.inner, "metrics", None)
        return {**(inner() if callable(inner) else {}), "cache_hits": self.hits, "cache_misses": self.misses}

    def progress(self) -> dict[str, str]:
        return {**self.inner.progress(), f"{self.name} cached": f"{self.hits}/{self.hits + self.misses}"}
