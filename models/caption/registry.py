"""Caption engines by backend name, and the configuration they share.

``ENGINES`` maps a backend name to a loader ``(config, model_name, model_path, device) ->
CaptionEngine``; another backend (SGLang, an OpenAI-compatible endpoint) registers itself with
:func:`register` in its own module, listed in ``_BACKEND_MODULES`` so that it is imported only
when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from engine.config import option
from engine.errors import ConfigError
from models.caption.base import CaptionEngine, SamplingParams

DEFAULT_MODEL = "llava-hf/llava-v1.6-vicuna-7b-hf"


@dataclass(frozen=True)
class CaptionConfig:
    caption_model: str = option(
        DEFAULT_MODEL,
        "caption engine: local folder or hub id of a LLaVA-NeXT checkpoint (the DenseFusion "
        "engine once converted to the llava-hf layout), or 'tiny'",
    )
    caption_backend: str = option("transformers", "caption backend: transformers")
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
        if self.caption_backend not in _BACKEND_MODULES:
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


EngineLoader = Callable[[CaptionConfig, str, str, str], CaptionEngine]
ENGINES: dict[str, EngineLoader] = {}
# backend name -> module that registers it (imported on demand: backends import heavy packages)
_BACKEND_MODULES = {"transformers": "models.caption.transformers_backend"}


def register(name: str) -> Callable[[EngineLoader], EngineLoader]:
    def add(loader: EngineLoader) -> EngineLoader:
        ENGINES[name] = loader
        return loader

    return add


def load_engine(config: CaptionConfig, model_name: str, model_path: str, device: str) -> CaptionEngine:
    """Load the configured backend's engine on ``device``; ``model_path`` is what its loader reads."""
    importlib.import_module(_BACKEND_MODULES[config.caption_backend])
    return ENGINES[config.caption_backend](config, model_name, model_path, device)
