"""Which model each role loads: the one place that decides between a real model and a tiny one.

``--models tiny`` swaps every model-backed stage for a random-weight tiny model of the same
architecture (models/tiny.py). A model option left at its default follows that switch; an
option the user set to another model contradicts it and is an error, not silently ignored:
half a run on tiny models writes noise captions anyway (quality control only flags them), so a
mixed run has no use that is worth a surprise. An option set to '' turns its model off
either way (for the models that can be off).
"""

from __future__ import annotations

from pathlib import Path

from engine.core.config import RuntimeConfig, check_tiny_swap, model_options
from models.base import TINY, ModelRef


def resolve_model(role: str, name: str, runtime: RuntimeConfig) -> ModelRef | None:
    """The model ``role`` loads, given its option's value ``name``; ``None`` when it is off.

    Checked (it exists, or is a hub id that can be fetched) before any work starts;
    ``ref.resolve(cache_dir)`` gives the path to load (a tiny model is built there on first use).
    """
    _, option = model_options()[role]
    check_tiny_swap(option, name, runtime.models)  # RunConfig.validate ran it too, for a run's config
    if runtime.models == TINY and (name or not option.default):
        name = TINY  # the default follows --models tiny; a model the user turned off ('') stays off
    if not name:
        return None
    ref = ModelRef(name, role)
    ref.check()
    if ref.is_tiny:
        # Built now, in the thread that builds the stages, before any stage thread starts: a build
        # draws its weights from torch's one global generator, which another stage's model load
        # (its setup, in a thread of its own) would draw from in between, giving other weights.
        ref.resolve(Path(runtime.cache_dir))
    return ref


def ran_tiny_models(config: dict) -> bool:
    """Whether a run's recorded config (``RunConfig.to_dict()``, kept per invocation in
    metrics.json) swapped every model for a tiny one: its captions, tags and boxes are noise."""
    return (config.get("runtime") or {}).get("models") == TINY
