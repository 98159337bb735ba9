"""The portable caption backend on ``transformers``: every caption family (families.py).

The image tokens are the processor's (LLaVA-NeXT's AnyRes: tiles over the best-fitting grid
pinpoint plus a low-resolution overview; Qwen2.5-VL's dynamic resolution within min/max pixels).
A batch is generated in one call with left padding (so every sequence's last prompt token lines
up for decoding); greedy unless a temperature is set.
bfloat16 weights and SDPA attention on a GPU, float32 on the CPU.

Two things make it fast on a GPU (``python -m bench caption --real-size`` measures them):

* ``generate()`` takes a window of several batches, sorts it by prompt length (text plus the
  image's AnyRes tokens, which dominate: ~600 to ~2,900 per image) and generates the
  micro-batches of ``batch_size`` shortest first, so a batch is mostly real tokens, not
  left padding. Captions come back in the caller's order.
* ``decode``: ``dynamic`` is the library's default KV cache, grown every step; ``static``
  preallocates it; ``compiled`` adds ``torch.compile`` of the decoding step (on a GPU in
  ``reduce-overhead`` mode: CUDA graphs, so a step costs kernels, not Python). The static
  cache is sized in buckets of ``_CACHE_BUCKET`` tokens and never shrinks, so the compiled
  step is traced again only when a longer prompt than any before arrives.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.caption.base import SamplingParams
from models.caption.chat import chat_text, check_chat_template
from models.caption.families import family_for
from models.errors import ConfigError
from models.records import Caption

log = logging.getLogger(__name__)

# KV cache grown every step, preallocated, or preallocated with a torch.compile'd decoding step
DECODE_MODES = ("dynamic", "static", "compiled")


@dataclass(frozen=True)
class TransformersSettings:
    batch_size: int  # images per generation call
    decode: str  # one of DECODE_MODES, or "auto" (see resolve_decode)
    dtype: str  # "auto" (see torch_dtype) or a torch dtype name
    cpu_threads: int  # torch threads on the CPU

_CACHE_BUCKET = 512  # static KV cache length granularity (tokens): few distinct shapes to compile


class TransformersCaptionEngine:
    backend = "transformers"

    def __init__(self, model: str, processor, net, device: str, *, batch_size: int = 8,
                 decode: str = "dynamic"):
        """``processor`` and ``net`` as loaded by :func:`load` (or built in memory by a benchmark);
        ``batch_size`` images per generation call; ``decode`` one of ``DECODE_MODES``."""
        if decode not in DECODE_MODES:
            raise ConfigError(f"decode mode {decode!r}: expected one of {', '.join(DECODE_MODES)}")
        self.model, self.processor, self.net, self.device = model, processor, net, device
        self.batch_size, self.decode = batch_size, decode
        check_chat_template(processor, model)
        processor.tokenizer.padding_side = "left"
        self.dtype = net.dtype
        eos = net.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids)
        self._tokens = {"prompt_tokens": 0, "padding_tokens": 0, "compile_fallbacks": 0}

    def generate(
        self, prompts: list[str], images: list[np.ndarray], /, *, params: SamplingParams
    ) -> list[Caption]:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        batches = [list(range(len(prompts)))]
        if len(prompts) > self.batch_size:
            batches = length_sorted_batches(prompt_lengths(self.processor, prompts, images), self.batch_size)
        captions: list[Caption | None] = [None] * len(prompts)
        for chunk in batches:
            done = self._generate_or_split([prompts[i] for i in chunk], [images[i] for i in chunk], params)
            for i, caption in zip(chunk, done, strict=True):
                captions[i] = caption
        return captions

    def _generate_or_split(self, prompts, images, params: SamplingParams) -> list[Caption]:
        try:
            return self._generate_batch(prompts, images, params)
        except Exception as exc:  # noqa: BLE001 - retried one by one so one bad input fails alone
            if len(prompts) == 1:
                return [self._error(exc)]
        return [self._generate_or_split([p], [i], params)[0] for p, i in zip(prompts, images, strict=True)]

    def _generate_batch(self, prompts, images, params: SamplingParams) -> list[Caption]:
        import torch

        start = time.perf_counter()
        inputs = self.processor(
            text=[chat_text(self.processor, p) for p in prompts],
            # decoded views may be read-only; torch.from_numpy warns on those (copy only then)
            images=[np.require(image, requirements="W") for image in images],
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        sampling = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        prompt_length = inputs["input_ids"].shape[1]

        def run(decode: str):
            with torch.inference_mode():
                return self.net.generate(
                    **inputs,
                    max_new_tokens=params.max_new_tokens,
                    min_new_tokens=params.min_new_tokens,
                    pad_token_id=self.pad_id,
                    **sampling,
                    **cache_options(decode, self.device, prompt_length + params.max_new_tokens),
                )

        try:
            out = run(self.decode)
        except Exception as exc:
            if self.decode != "compiled":
                raise
            # Compiling and CUDA-graph capture depend on the machine (Triton, a C++ compiler,
            # the driver): if the same batch decodes uncompiled, slower beats failing. If it
            # fails there too, the input is at fault: that error goes up, compiling stays on.
            out = run("static")
            log.warning("caption: compiled decoding failed (%s: %s); decoding uncompiled with a "
                        "static KV cache from now on", type(exc).__name__, str(exc).splitlines()[0])
            self.decode = "static"
            self._tokens["compile_fallbacks"] += 1
        mask = inputs["attention_mask"]
        self._tokens["prompt_tokens"] += mask.numel()
        self._tokens["padding_tokens"] += mask.numel() - int(mask.sum())
        new_tokens = out[:, prompt_length:].tolist()
        prompt_tokens = mask.sum(dim=1).tolist()
        seconds = (time.perf_counter() - start) / len(prompts)  # the batch's time, shared out
        return [
            self._caption(tokens, n_prompt, seconds)
            for tokens, n_prompt in zip(new_tokens, prompt_tokens, strict=True)
        ]

    def _caption(self, tokens: list[int], prompt_tokens: int, seconds: float) -> Caption:
        stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Caption(
            text=text,
            prompt_tokens=int(prompt_tokens),
            output_tokens=len(kept),
            finish_reason="length" if stop is None else "stop",
            seconds=seconds,
            model=self.model,
            backend=self.backend,
        )

    def _error(self, exc: Exception) -> Caption:
        return Caption(f"{type(exc).__name__}: {exc}", 0, 0, "error", 0.0, self.model, self.backend)

    def metrics(self) -> dict[str, float]:
        """Padding share of the prompt batches (what length sorting saves) and compile fallbacks."""
        figures = {name: float(n) for name, n in self._tokens.items()}
        if self._tokens["prompt_tokens"]:
            figures["padding_share"] = self._tokens["padding_tokens"] / self._tokens["prompt_tokens"]
        return figures

    def close(self) -> None:
        self.net = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def prompt_lengths(processor, prompts: list[str], images: list[np.ndarray]) -> list[int]:
    """Tokens each prompt will take: its chat text plus the image's AnyRes tokens, counted from
    the image size alone (the processor's own count, without tiling the image)."""
    texts = [chat_text(processor, p) for p in prompts]
    text_tokens = [len(ids) for ids in processor.tokenizer(texts)["input_ids"]]
    sizes = [image.shape[:2] for image in images]
    valid = [i for i, (h, w) in enumerate(sizes) if h > 0 and w > 0]  # a bad image fails later, alone
    counts = processor._get_num_multimodal_tokens(image_sizes=[sizes[i] for i in valid])
    image_tokens = dict(zip(valid, counts.num_image_tokens, strict=True))
    # the chat text holds one <image> placeholder, which the processor expands
    return [n - 1 + image_tokens.get(i, 1) for i, n in enumerate(text_tokens)]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """A window's indices in batches of ``batch_size``, shortest prompts first."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def cache_options(decode: str, device: str, max_length: int) -> dict:
    """``generate()`` keywords for a decode mode (``max_length``: prompt + new tokens)."""
    if decode == "dynamic":
        return {}
    bucket = -(-max_length // _CACHE_BUCKET) * _CACHE_BUCKET
    options = {"cache_implementation": "static", "max_cache_len": bucket}
    if decode == "static":
        return {**options, "disable_compile": True}  # transformers would compile it on a GPU
    return {**options, "compile_config": compile_config(device)}


def compile_config(device: str):
    """How the decoding step is compiled: CUDA graphs on a GPU; plain inductor on the CPU,
    where transformers compiles only when told to (its private ``_compile_all_devices``)."""
    from transformers import CompileConfig

    if device.startswith("cuda"):
        return CompileConfig(mode="reduce-overhead")
    config = CompileConfig(mode="default")
    config._compile_all_devices = True
    return config


def resolve_decode(name: str, device: str) -> str:
    """``auto``: compiled on a GPU (where per-step overhead dominates decoding), dynamic on the
    CPU (where compiling costs more time than a run of the tiny model saves)."""
    if name == "auto":
        return "compiled" if device.startswith("cuda") else "dynamic"
    return name


def torch_dtype(name: str, device: str):
    """``auto``: bfloat16 on a GPU, float32 on the CPU (where bf16 matmuls are slow or missing)."""
    import torch

    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return getattr(torch, name)


def load(model: str, path: str, device: str, settings: TransformersSettings) -> TransformersCaptionEngine:
    """A checkpoint folder or hub id of a caption family (families.py), read by the libraries'
    own loaders."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family_for(path, model)  # an unsupported architecture is refused before its weights load
    if Path(path, "config.json").is_file() and "mm_vision_tower" in json.loads(Path(path, "config.json").read_text()):
        raise ConfigError(f"caption model {path} is in the original LLaVA layout, which transformers does not "
                          f"load: use --caption-backend sglang, or a llava-hf LLaVA-NeXT checkpoint")
    if device == "cpu":
        torch.set_num_threads(settings.cpu_threads)  # measured: 2 threads beside OCR/decode ran 6x slower
    processor = AutoProcessor.from_pretrained(path)
    net = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=torch_dtype(settings.dtype, device),
        attn_implementation="sdpa",
        device_map=device if device.startswith("cuda") else None,  # weights straight onto the GPU
    )
    return TransformersCaptionEngine(
        model, processor, net.to(device).eval(), device,
        batch_size=settings.batch_size, decode=resolve_decode(settings.decode, device),
    )
