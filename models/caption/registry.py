"""Caption engines by backend name, and the configuration they share.

``ENGINES`` maps a backend name to a loader ``(config, model_name, model_path, device) ->
CaptionEngine``; another backend (SGLang, an OpenAI-compatible endpoint) registers itself with
:func:`register` in its own module, listed in ``_BACKEND_MODULES`` so that it is imported only
when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from engine.config import CaptionConfig
from models.caption.base import CaptionEngine

EngineLoader = Callable[[CaptionConfig, str, str, str], CaptionEngine]
ENGINES: dict[str, EngineLoader] = {}
# backend name -> module that registers it (imported on demand: backends import heavy packages)
_BACKEND_MODULES = {"transformers": "models.caption.transformers_backend"}


def backend_names() -> list[str]:
    return sorted(_BACKEND_MODULES)


def register(name: str) -> Callable[[EngineLoader], EngineLoader]:
    def add(loader: EngineLoader) -> EngineLoader:
        ENGINES[name] = loader
        return loader

    return add


def load_engine(config: CaptionConfig, model_name: str, model_path: str, device: str) -> CaptionEngine:
    """Load the configured backend's engine on ``device``; ``model_path`` is what its loader reads."""
    importlib.import_module(_BACKEND_MODULES[config.caption_backend])
    return ENGINES[config.caption_backend](config, model_name, model_path, device)
