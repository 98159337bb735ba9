"""Caption engines by backend name.

Each backend (transformers, SGLang, an OpenAI-compatible endpoint) is a module listed in
``_BACKEND_MODULES`` with a ``load(model_name, model_path, device, settings) -> CaptionEngine``,
imported only when asked for (backends import heavy packages). ``settings`` is the backend's
own frozen settings object (``TransformersSettings``, ``SglangSettings``, ``ApiSettings``); the
engine's caption stage builds it from the run's configuration. ``auto`` picks SGLang on a GPU
where it is installed and serves the checkpoint's family natively, else transformers, and says so.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from models.caption.base import CaptionEngine
from models.caption.families import local_family

log = logging.getLogger(__name__)

# backend name -> module with its load() (imported on demand)
_BACKEND_MODULES = {
    "transformers": "models.caption.transformers_backend",
    "sglang": "models.caption.sglang_backend",
    "openai": "models.caption.openai_backend",
}


def backend_names() -> list[str]:
    return ["auto", *sorted(_BACKEND_MODULES)]


def resolve_backend(requested: str, device: str, model: str = "") -> str:
    """``auto`` settled (for the family of ``model`` where it is a local checkpoint folder); an
    explicit ``sglang`` without SGLang fails before any work."""
    from models.caption.sglang_backend import require_sglang, sglang_available

    if requested == "sglang":
        require_sglang()
    if requested != "auto":
        return requested
    if not device.startswith("cuda"):
        return "transformers"
    family = local_family(model)
    if family is not None and family.sglang_refusal:
        log.info("caption backend auto: transformers (SGLang does not serve %s natively here)", family.name)
        return "transformers"
    if sglang_available():
        return "sglang"
    log.warning("caption backend auto: SGLang is not installed, using transformers "
                "(pip install sglang for the fast GPU path)")
    return "transformers"


def prepare_backend(backend: str, device: str, settings: Any) -> None:
    """What a backend must do on the main thread before any work (SGLang: its CPU environment,
    its child-failure signal handler); a backend module without ``prepare`` needs nothing."""
    prepare = getattr(importlib.import_module(_BACKEND_MODULES[backend]), "prepare", None)
    if prepare is not None:
        prepare(device, settings)


def load_engine(backend: str, model_name: str, model_path: str, device: str, settings: Any) -> CaptionEngine:
    """Load ``backend``'s engine (resolved, not ``auto``) on ``device``; ``model_path`` is what
    its loader reads, ``settings`` that backend's settings object."""
    return importlib.import_module(_BACKEND_MODULES[backend]).load(model_name, model_path, device, settings)
