"""Caption backends side by side on the same inputs, in one run.

    python -m bench caption_backends --backend transformers openai --images 16 --output-tokens 32

Every backend captions the same images with the same fusion prompts at a fixed output length
(min = max new tokens), after one warm-up batch. ``openai`` without ``--api-base`` runs against
a local fake chat-completions server (``bench/chat_server.py``) whose latency is set by
``--fake-latency``: it measures the client (encoding, concurrency, HTTP), not a model.
``sglang`` needs SGLang and a GPU. Figures: images/s, prompt and output tokens/s, and each
backend's ratio to the first one; on a GPU also the share of the LLaVA-1.6-7B roofline bound.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np

ROOFLINE_IMAGES_PER_S = 4.5  # LLaVA-1.6-7B, ~3,200 prompt + 250 output tokens, one H100


def bench_inputs(n: int, seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    """Images of mixed aspect ratios (AnyRes picks different grids) and their fusion prompts."""
    from engine.prompt import fusion_prompt
    from engine.record import Box, OcrLine

    rng = np.random.default_rng(seed)
    shapes = [(672, 896), (896, 672), (768, 768), (448, 1344)]
    images, prompts = [], []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        images.append(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        boxes = [Box(f"object {j}", 0.9, (0.1 * j, 0.1, 0.1 * j + 0.2, 0.5), "bench")
                 for j in range(1 + i % 4)]
        ocr = [OcrLine(f"TEXT LINE {i}", 0.9, (0.1, 0.6, 0.5, 0.7))]
        prompts.append(fusion_prompt(f"alt text of image {i}", boxes, ocr))
    return prompts, images


def build_engine(backend: str, args: argparse.Namespace, stack: contextlib.ExitStack):
    """The engine for ``backend`` and a label saying what it ran against."""
    from engine.config import ApiConfig, SglangConfig
    from models.base import ModelRef

    if backend == "openai":
        from models.caption.openai_backend import OpenAIEngine

        base, label = args.api_base, f"openai ({args.api_base})"
        if not base:
            from bench.chat_server import ChatServer

            server = stack.enter_context(
                ChatServer(latency=args.fake_latency, output_words=args.output_tokens)
            )
            base, label = server.url, f"openai (local fake server, {args.fake_latency}s latency)"
        cfg = ApiConfig(api_base=base, api_model=args.api_model or "bench",
                        api_concurrency=args.concurrency)
        cfg.validate()
        return OpenAIEngine(cfg), label
    path = ModelRef(args.model, "caption").resolve(Path(args.cache_dir))
    if backend == "sglang":
        from models.caption.sglang_backend import SglangEngine

        cfg = SglangConfig(sglang_dummy_weights=args.dummy_weights)
        cfg.validate()
        return SglangEngine(cfg, path), f"sglang ({args.model})"
    from models.base import resolve_device
    from models.caption.registry import CaptionConfig, load_engine

    device = resolve_device(args.device)
    cfg = dataclasses.replace(CaptionConfig(), caption_model=args.model, caption_backend=backend)
    return load_engine(cfg, args.model, path, device), f"{backend} ({args.model}, {device})"


def run_backend(engine, prompts, images, args) -> dict[str, float]:
    from models.caption.base import SamplingParams
    from models.caption.figures import CaptionTally

    params = SamplingParams(max_new_tokens=args.output_tokens, min_new_tokens=args.output_tokens)
    engine.generate(prompts[: args.batch], images[: args.batch], params=params)  # warm-up
    tally = CaptionTally()
    for i in range(0, len(prompts), args.batch):
        start = time.perf_counter()
        captions = engine.generate(prompts[i : i + args.batch], images[i : i + args.batch],
                                   params=params)
        tally.add(captions, time.perf_counter() - start)
    figures = tally.figures()
    if hasattr(engine, "metrics"):
        figures.update(engine.metrics())
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench caption_backends", description=__doc__)
    parser.add_argument("--backend", nargs="+", default=["transformers", "openai"],
                        choices=("transformers", "openai", "sglang"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="images per generate() call")
    parser.add_argument("--output-tokens", type=int, default=32, help="fixed caption length")
    parser.add_argument("--model", default="tiny", help="caption model (folder, hub id or tiny)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "densefusion"))
    parser.add_argument("--dummy-weights", action="store_true", help="sglang: load_format=dummy")
    parser.add_argument("--api-base", default="", help="openai: endpoint (default: local fake)")
    parser.add_argument("--api-model", default="")
    parser.add_argument("--concurrency", type=int, default=16, help="openai: requests in flight")
    parser.add_argument("--fake-latency", type=float, default=0.2,
                        help="openai without --api-base: seconds the fake server takes per request")
    args = parser.parse_args(argv)

    import torch

    prompts, images = bench_inputs(args.images)
    print(f"{args.images} images, batch {args.batch}, {args.output_tokens} output tokens each")
    rows = []
    for backend in args.backend:
        with contextlib.ExitStack() as stack:
            engine, label = build_engine(backend, args, stack)
            try:
                rows.append((label, run_backend(engine, prompts, images, args)))
            finally:
                engine.close()
    base = rows[0][1].get("images_per_s", 0.0)
    print(f"{'backend':<52} {'img/s':>8} {'prompt tok/s':>13} {'out tok/s':>10} {'errors':>6} "
          f"{'vs first':>8}")
    for label, fig in rows:
        rate = fig.get("images_per_s", 0.0)
        print(f"{label:<52} {rate:>8.2f} {fig.get('prompt_tokens_per_s', 0):>13.0f} "
              f"{fig.get('output_tokens_per_s', 0):>10.0f} {fig.get('finish_error', 0):>6.0f} "
              f"{(rate / base if base else 0):>7.2f}x")
        extra = {k: round(v, 3) for k, v in fig.items()
                 if k.startswith(("api_", "prefix_cache", "cached"))}
        if extra:
            print(f"{'':<52} {extra}")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        for label, fig in rows:
            per_gpu = fig.get("images_per_s", 0.0) / n
            print(f"{label}: {per_gpu:.2f} images/s per GPU = "
                  f"{per_gpu / ROOFLINE_IMAGES_PER_S:.0%} of the ~{ROOFLINE_IMAGES_PER_S} roofline "
                  f"bound (meaningful at LLaVA-1.6-7B size, ~250 output tokens)")
    return 0
