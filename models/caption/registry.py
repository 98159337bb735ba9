"""Caption engines by backend name, and the configuration they share.

``ENGINES`` maps a backend name to a loader ``(config, model_name, model_path, device,
settings) -> CaptionEngine``; each backend (transformers, SGLang, an OpenAI-compatible
endpoint) registers itself with :func:`register` in its own module, listed in
``_BACKEND_MODULES`` so that it is imported only when asked for. ``settings`` carries the
sections only some backends read (``--api-*``, ``--sglang-*``). ``auto`` picks SGLang on a GPU
where it is installed, else transformers, and says so.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.config import ApiConfig, CaptionConfig, SglangConfig
from models.caption.base import CaptionEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSettings:
    """Config sections that only some backends read."""

    api: ApiConfig = field(default_factory=ApiConfig)
    sglang: SglangConfig = field(default_factory=SglangConfig)
    out: str = ""  # the run's output folder (the openai backend keeps its journal there)


EngineLoader = Callable[[CaptionConfig, str, str, str, BackendSettings], CaptionEngine]
ENGINES: dict[str, EngineLoader] = {}
# backend name -> module that registers it (imported on demand: backends import heavy packages)
_BACKEND_MODULES = {
    "transformers": "models.caption.transformers_backend",
    "sglang": "models.caption.sglang_backend",
    "openai": "models.caption.openai_backend",
}


def backend_names() -> list[str]:
    return ["auto", *sorted(_BACKEND_MODULES)]


def register(name: str) -> Callable[[EngineLoader], EngineLoader]:
    def add(loader: EngineLoader) -> EngineLoader:
        ENGINES[name] = loader
        return loader

    return add


def resolve_backend(requested: str, device: str) -> str:
    """``auto`` settled; an explicit ``sglang`` without SGLang fails before any work."""
    from models.caption.sglang_backend import require_sglang, sglang_available

    if requested == "sglang":
        require_sglang()
    if requested != "auto":
        return requested
    if not device.startswith("cuda"):
        return "transformers"
    if sglang_available():
        return "sglang"
    log.warning("caption backend auto: SGLang is not installed, using transformers "
                "(pip install sglang for the fast GPU path)")
    return "transformers"


def load_engine(config: CaptionConfig, model_name: str, model_path: str, device: str,
                settings: BackendSettings | None = None) -> CaptionEngine:
    """Load the configured backend's engine on ``device``; ``model_path`` is what its loader reads."""
    backend = resolve_backend(config.caption_backend, device)
    importlib.import_module(_BACKEND_MODULES[backend])
    return ENGINES[backend](config, model_name, model_path, device, settings or BackendSettings())
