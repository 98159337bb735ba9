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

from engine.config import ApiConfig, SglangConfig, option
from engine.errors import ConfigError
from models.caption.base import CaptionEngine, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MODEL = "llava-hf/llava-v1.6-vicuna-7b-hf"


@dataclass(frozen=True)
class CaptionConfig:
    caption_model: str = option(
        DEFAULT_MODEL,
        "caption engine: local folder or hub id of a LLaVA-NeXT checkpoint (the DenseFusion "
        "engine once converted to the llava-hf layout), or 'tiny'",
    )
    caption_backend: str = option(
        "auto",
        "caption backend: auto (sglang on a GPU where installed, else transformers), "
        "transformers, sglang, openai (--api-base, --api-model; key in $OPENAI_API_KEY)",
        choices=("auto", "transformers", "sglang", "openai"),
    )
    caption_batch: int = option(8, "images per generation batch")
    caption_max_side: int = option(1344, "longer side of the image handed to the engine (AnyRes)")
    max_new_tokens: int = option(400, "token limit of a caption (the paper's average ~190 words)")
    min_new_tokens: int = option(
        0, "generate at least this many tokens (benchmarks set it to --max-new-tokens)"
    )
    temperature: float = option(0.0, "sampling temperature; 0 = greedy")
    top_p: float = option(1.0, "nucleus sampling mass (with temperature > 0)")
    caption_dtype: str = option(
        "auto",
        "weights dtype: auto (bfloat16 on a GPU, float32 on the CPU), bfloat16, float16, float32",
        choices=("auto", "bfloat16", "float16", "float32"),
    )

    def validate(self) -> None:
        if self.caption_backend not in (*_BACKEND_MODULES, "auto"):
            raise ConfigError(
                f"--caption-backend {self.caption_backend!r}: known backends are "
                f"{', '.join(sorted(_BACKEND_MODULES))}"
            )
        if self.caption_batch < 1 or self.max_new_tokens < 1:
            raise ConfigError("--caption-batch and --max-new-tokens must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("--min-new-tokens must be between 0 and --max-new-tokens")
        if self.caption_max_side < 64:
            raise ConfigError("--caption-max-side must be >= 64")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            min_new_tokens=self.min_new_tokens,
        )


@dataclass(frozen=True)
class BackendSettings:
    """Config sections that only some backends read."""

    api: ApiConfig = field(default_factory=ApiConfig)
    sglang: SglangConfig = field(default_factory=SglangConfig)


EngineLoader = Callable[[CaptionConfig, str, str, str, BackendSettings], CaptionEngine]
ENGINES: dict[str, EngineLoader] = {}
# backend name -> module that registers it (imported on demand: backends import heavy packages)
_BACKEND_MODULES = {
    "transformers": "models.caption.transformers_backend",
    "sglang": "models.caption.sglang_backend",
    "openai": "models.caption.openai_backend",
}


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
