"""Caption engine running SGLang in process (written against sglang 0.5.23).

One ``sglang.Engine`` spans the node's GPUs (data parallel, optionally tensor parallel
inside each replica). Requests are laid out so that the fixed fusion instruction is the
shared prefix of every prompt (the radix cache keeps its KV once for all of them), images go
in as ``image_data``, and requests stay in flight continuously: ``generate`` hands its batch
to a :class:`~models.caption.window.RequestWindow` that admits a new request as soon as one
finishes, across batches and the caption stage's two calling threads, so the GPU does not
idle between batches. Request building is pure functions, testable without SGLang.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core.errors import ConfigError
from engine.core.record import Caption
from models.caption.base import SamplingParams
from models.caption.window import RequestWindow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SglangSettings:
    """What the engine's ``--sglang-*`` options say (engine/core/config.py explains each)."""

    dp_size: int  # 0: one replica per visible GPU / tp_size
    tp_size: int
    dummy_weights: bool
    radix_cache: bool
    mem_fraction: float
    window: int  # requests in flight in the engine
    chat_template: str  # a key of CHAT_TEMPLATES
    image_first: bool

SGLANG_VERSION = "0.5.23"  # the API this module is written against
IMAGE_TOKEN = "<image>"

# (text before the user turn, text after it) of the chat templates LLaVA-1.6 checkpoints use.
CHAT_TEMPLATES = {
    "vicuna_v1": (
        ("A chat between a curious human and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the human's questions. USER: "),
        " ASSISTANT:",
    ),
    "mistral_instruct": ("[INST] ", " [/INST]"),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
}


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


def require_sglang() -> None:
    """An explicit ``--caption-backend sglang`` without SGLang fails before any work."""
    if not sglang_available():
        raise ConfigError(
            f"--caption-backend sglang: SGLang is not installed (pip install "
            f"sglang=={SGLANG_VERSION} on a GPU node), or use --caption-backend "
            f"transformers / auto"
        )


# --- request building (pure) --------------------------------------------------------------


def layout_prompt(prompt: str, template: str, *, image_first: bool = False) -> str:
    """The model's full input text: chat template around the fusion prompt and the image.

    The fusion prompt starts with its fixed instruction, and the chat template's head is
    fixed too, so with the image after the text every request begins with the same
    instruction tokens: the radix cache's shared prefix. The fusion template ends with
    ``[IMAGE]:``, which the image then follows.
    """
    head, tail = CHAT_TEMPLATES[template]
    if image_first:
        return f"{head}{IMAGE_TOKEN}\n{prompt}{tail}"
    return f"{head}{prompt}\n{IMAGE_TOKEN}{tail}"


def sampling_dict(params: SamplingParams) -> dict[str, Any]:
    return {
        "max_new_tokens": params.max_new_tokens,
        "min_new_tokens": params.min_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }


def generate_request(prompt: str, image: np.ndarray, sampling: dict[str, Any], cfg: SglangSettings) -> dict[str, Any]:
    """Keyword arguments of ``Engine.async_generate`` for one image (SGLang takes PIL images)."""
    from PIL import Image

    text = layout_prompt(prompt, cfg.chat_template, image_first=cfg.image_first)
    return {"prompt": text, "image_data": Image.fromarray(image), "sampling_params": sampling}


def engine_args(cfg: SglangSettings, model_path: str, n_gpus: int) -> dict[str, Any]:
    """Keyword arguments of ``sglang.Engine`` (they mirror its ``ServerArgs``)."""
    if n_gpus < cfg.tp_size:
        raise ConfigError(
            f"--sglang-tp-size {cfg.tp_size} needs that many GPUs; {n_gpus} visible"
        )
    return {
        "model_path": model_path,
        "tp_size": cfg.tp_size,
        "dp_size": cfg.dp_size or n_gpus // cfg.tp_size,
        "load_format": "dummy" if cfg.dummy_weights else "auto",
        "disable_radix_cache": not cfg.radix_cache,
        # 0 = not settled by the placement (engine/core/placement.py): SGLang's own default
        "mem_fraction_static": cfg.mem_fraction or None,
        "random_seed": 0,
        "log_level": "error",
    }


def caption_from_output(out: dict[str, Any], seconds: float, model: str) -> Caption:
    meta = out.get("meta_info", {})
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else str(finish)
    if kind == "abort":
        message = finish.get("message", "aborted") if isinstance(finish, dict) else "aborted"
        return Caption(f"sglang aborted the request: {message}", int(meta.get("prompt_tokens", 0)),
                       0, "error", seconds, model, "sglang")
    return Caption(
        out.get("text", ""),
        int(meta.get("prompt_tokens", 0)),
        int(meta.get("completion_tokens", 0)),
        "length" if kind == "length" else "stop",
        seconds,
        model,
        "sglang",
    )


# --- the engine -----------------------------------------------------------------------------


class SglangEngine:
    backend = "sglang"

    def __init__(self, cfg: SglangSettings, model_path: str):
        require_sglang()
        import sglang
        import torch

        if sglang.__version__ != SGLANG_VERSION:
            log.warning("sglang %s installed; this backend is written against %s",
                        sglang.__version__, SGLANG_VERSION)
        self.cfg = cfg
        self.model = model_path
        self.device = "cuda"
        args = engine_args(cfg, model_path, torch.cuda.device_count())
        log.info("starting sglang.Engine(%s)", args)
        self._engine = sglang.Engine(**args)
        self._window = RequestWindow(cfg.window, "sglang")
        self._tokens = {"prompt_tokens": 0, "output_tokens": 0, "cached_tokens": 0}

    def generate(
        self, prompts: list[str], images: list[np.ndarray], /, *, params: SamplingParams
    ) -> list[Caption]:
        """Thread-safe: callers in several threads share one window of in-flight requests."""
        return self._window.run(self._generate_all(prompts, images, params))

    async def _generate_all(self, prompts, images, params) -> list[Caption]:
        sampling = sampling_dict(params)  # one dict shared by the batch: SGLang only reads it
        return list(await asyncio.gather(
            *(self._caption(p, im, sampling) for p, im in zip(prompts, images))
        ))

    async def _caption(self, prompt: str, image: np.ndarray, sampling: dict) -> Caption:
        request = generate_request(prompt, image, sampling, self.cfg)
        async with self._window.slot():
            start = time.monotonic()
            try:
                out = await self._engine.async_generate(**request)
            except Exception as exc:  # noqa: BLE001 - one request's failure is one sample's
                return Caption(f"sglang: {type(exc).__name__}: {exc}", 0, 0, "error",
                               time.monotonic() - start, self.model, self.backend)
        meta = out.get("meta_info", {})
        self._tokens["prompt_tokens"] += int(meta.get("prompt_tokens", 0))
        self._tokens["output_tokens"] += int(meta.get("completion_tokens", 0))
        self._tokens["cached_tokens"] += int(meta.get("cached_tokens", 0))
        return caption_from_output(out, time.monotonic() - start, self.model)

    def metrics(self) -> dict[str, float]:
        figures = {name: float(n) for name, n in self._tokens.items()}
        if self._tokens["prompt_tokens"]:
            figures["prefix_cache_hit_rate"] = (
                self._tokens["cached_tokens"] / self._tokens["prompt_tokens"]
            )
        return figures

    def close(self) -> None:
        self._window.close()
        self._engine.shutdown()


def load(model: str, path: str, device: str, settings: SglangSettings) -> SglangEngine:
    return SglangEngine(settings, path)
