"""Which model each role loads: the one place that decides between a real model and a tiny one.

``--models tiny`` swaps every model-backed stage for a random-weight tiny model of the same
architecture (models/tiny.py). A model option left at its default follows that switch; an
option the user set to another model contradicts it and is an error, not silently ignored:
half a run on tiny models writes noise captions anyway (quality control only flags them), so a
mixed run has no use that is worth a surprise. An option set to '' turns its model off
either way (for the models that can be off).
"""

from __future__ import annotations

import dataclasses

from engine.core.config import CaptionConfig, CurateConfig, ExpertsConfig, RuntimeConfig, flag_name
from engine.core.errors import ConfigError
from models.base import TINY, ModelRef

# role -> the config option that names its model
MODEL_OPTIONS = {
    "caption": (CaptionConfig, "caption_model"),
    "embed": (CurateConfig, "embed_model"),
    "ram_plus": (ExpertsConfig, "ram_plus_model"),
    "owlv2": (ExpertsConfig, "owlv2_model"),
    "detector": (ExpertsConfig, "closed_detector"),
}


def resolve_model(role: str, name: str, runtime: RuntimeConfig) -> ModelRef | None:
    """The model ``role`` loads, given its option's value ``name``; ``None`` when it is off.

    Checked (it exists, or is a hub id that can be fetched) before any work starts;
    ``ref.resolve(cache_dir)`` gives the path to load (a tiny model is built there on first use).
    """
    section, field_name = MODEL_OPTIONS[role]
    option = next(f for f in dataclasses.fields(section) if f.name == field_name)
    if runtime.models == TINY and name not in (option.default, TINY, ""):
        raise ConfigError(
            f"{flag_name(option)} {name} contradicts --models tiny (which replaces every model with a "
            f"random-weight tiny one): leave out --models tiny to run {name}, or leave out {flag_name(option)}"
        )
    if runtime.models == TINY and (name or not option.default):
        name = TINY  # the default follows --models tiny; a model the user turned off ('') stays off
    if not name:
        return None
    ref = ModelRef(name, role)
    ref.check()
    return ref
