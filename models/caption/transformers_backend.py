"""LLaVA-NeXT (LLaVA-1.6) on ``transformers``: the portable caption backend.

AnyRes is the processor's: each image is tiled over the best-fitting grid pinpoint plus a
low-resolution overview. A batch is generated in one call with left padding (so every
sequence's last prompt token lines up for decoding); greedy unless a temperature is set.
bfloat16 weights and SDPA attention on a GPU, float32 on the CPU.
"""

from __future__ import annotations

import time

import numpy as np

from engine.errors import ConfigError
from engine.record import Caption
from models.caption.base import SamplingParams
from models.caption.registry import BackendSettings, CaptionConfig, register


class TransformersCaptionEngine:
    backend = "transformers"

    def __init__(self, model: str, processor, net, device: str):
        """``processor`` and ``net`` as loaded by :func:`load` (or built in memory by a benchmark)."""
        self.model, self.processor, self.net, self.device = model, processor, net, device
        if not getattr(processor, "chat_template", None):
            raise ConfigError(f"caption model {model!r} has no chat template in its processor")
        processor.tokenizer.padding_side = "left"
        self.dtype = net.dtype
        eos = net.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids)

    def chat_text(self, prompt: str) -> str:
        """The prompt in the checkpoint's own chat format, one image slot after the text."""
        message = [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image"}]}]
        return self.processor.apply_chat_template(message, add_generation_prompt=True)

    def generate(
        self, prompts: list[str], images: list[np.ndarray], /, *, params: SamplingParams
    ) -> list[Caption]:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        try:
            return self._generate_batch(prompts, images, params)
        except Exception as exc:  # noqa: BLE001 - retried one by one so one bad input fails alone
            if len(prompts) == 1:
                return [self._error(exc)]
        return [self.generate([p], [i], params=params)[0] for p, i in zip(prompts, images, strict=True)]

    def _generate_batch(self, prompts, images, params: SamplingParams) -> list[Caption]:
        import torch

        start = time.perf_counter()
        inputs = self.processor(
            text=[self.chat_text(p) for p in prompts],
            # decoded views may be read-only; torch.from_numpy warns on those (copy only then)
            images=[np.require(image, requirements="W") for image in images],
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        sampling = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        with torch.inference_mode():
            out = self.net.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.min_new_tokens,
                pad_token_id=self.pad_id,
                **sampling,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
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

    def close(self) -> None:
        self.net = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def torch_dtype(name: str, device: str):
    """``auto``: bfloat16 on a GPU, float32 on the CPU (where bf16 matmuls are slow or missing)."""
    import torch

    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return getattr(torch, name)


@register("transformers")
def load(
    config: CaptionConfig, model: str, path: str, device: str, _settings: BackendSettings
) -> TransformersCaptionEngine:
    """A llava-hf style checkpoint folder or hub id, read by the libraries' own loaders."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if device == "cpu":
        torch.set_num_threads(config.caption_cpu_threads)  # measured: 2 threads beside OCR/decode ran 6x slower
    processor = AutoProcessor.from_pretrained(path)
    net = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=torch_dtype(config.caption_dtype, device),
        attn_implementation="sdpa",
        device_map=device if device.startswith("cuda") else None,  # weights straight onto the GPU
    )
    return TransformersCaptionEngine(model, processor, net.to(device).eval(), device)
