"""Caption stage throughput: images/s and tokens/s at a fixed output length.

``python -m bench caption`` runs the tiny LLaVA-NeXT on the CPU through the caption stage
(the production loading path), batched and, as the baseline in the same run, one image per
call. ``--real-size`` builds LLaVA-1.6-7B (Vicuna) from its config with random weights
directly on the GPU (bf16, SDPA): the same cost as real weights, no download.
Every request generates exactly ``--tokens`` tokens (min = max new tokens).
``--backend A B ...`` compares caption backends on the same inputs instead
(``bench/_caption_backends.py``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import _caption_backends as caption_backends
from bench._common import cuda_sync

# DESIGN.md: LLaVA-1.6-7B, ~3,200 prompt tokens, 250 output tokens, roofline per GPU
ROOFLINE_IMAGES_PER_S = {"H100": 4.5, "A100": 2.4}
SIZES = ((600, 800), (1024, 683), (512, 1024), (900, 900))  # (height, width): mixed aspect ratios


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench caption", description=__doc__)
    parser.add_argument("--images", type=int, default=16, help="images per measured run")
    parser.add_argument("--batch", type=int, default=8, help="images per generation call")
    parser.add_argument("--tokens", type=int, default=None,
                        help="output tokens per image (default: 64 tiny, 250 real size)")
    parser.add_argument("--real-size", action="store_true",
                        help="LLaVA-1.6-7B with random weights on a GPU instead of the tiny model")
    parser.add_argument("--cache-dir", default="", help="tiny model cache (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    caption_backends.add_arguments(parser)
    return parser.parse_args(argv)


def make_samples(n: int):
    from engine.prompt import fusion_prompt
    from engine.record import Box, OcrLine, Sample, Source

    rng = np.random.default_rng(0)
    boxes = [Box(f"object {i}", 0.9, (0.1 * i, 0.1, 0.1 * i + 0.2, 0.5), "owlv2") for i in range(6)]
    ocr = [OcrLine("GRAND OPENING", 0.99, (0.1, 0.1, 0.9, 0.2)), OcrLine("FRESH BREAD DAILY", 0.98, (0.1, 0.3, 0.9, 0.4))]
    samples = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        sample = Sample(key=f"{i:06d}", source=Source("bench", "bench", str(i)), alt_text=f"a bakery storefront, photo {i}")
        sample.views["caption"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sample.prompt = fusion_prompt(sample.alt_text, boxes, ocr)
        samples.append(sample)
    return samples


def tiny_engine(cache_dir: Path, threads: int):
    """The tiny LLaVA-NeXT through the production loader (saved folder → from_pretrained)."""
    from engine.config import CaptionConfig
    from models import tiny
    from models.caption.registry import load_engine

    config = CaptionConfig(caption_cpu_threads=threads)
    return load_engine(config, "tiny", str(tiny.ensure("caption", cache_dir)), "cpu")


def real_size_engine():
    """A random-weight LLaVA-1.6-7B built directly on the GPU in bf16 with SDPA attention."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from models.caption.transformers_backend import TransformersCaptionEngine
    from models.tiny import LLAVA_NEXT_7B, llava_next_parts

    if not torch.cuda.is_available():
        raise SystemExit("--real-size needs a CUDA GPU (7B parameters: ~14 GB of bf16 weights)")
    config, processor = llava_next_parts(LLAVA_NEXT_7B)
    with torch.device("cuda"):
        net = LlavaNextForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    net.generation_config.pad_token_id = config.text_config.pad_token_id
    net.generation_config.eos_token_id = config.text_config.eos_token_id
    return TransformersCaptionEngine("llava-v1.6-7b-random", processor, net.eval(), "cuda")


def caption_stage(engine, batch: int, tokens: int):
    """The production caption stage around an engine that is already loaded."""
    from engine.config import CaptionConfig, RuntimeConfig
    from engine.stages.caption import CaptionStage

    config = CaptionConfig(
        caption_model=engine.model, caption_batch=batch, max_new_tokens=tokens, min_new_tokens=tokens
    )
    runtime = RuntimeConfig(out="unused", models="tiny" if engine.model == "tiny" else "", device=engine.device)
    stage = CaptionStage(config, runtime)
    stage.engine = engine
    return stage


def measure(stage, samples, batch: int) -> dict:
    import copy

    def run(todo):
        for i in range(0, len(todo), batch):
            stage.process(todo[i:i + batch])
        return todo

    run(copy.deepcopy(samples[:batch]))  # warm-up: kernels, allocator, lazy inits
    cuda_sync()
    todo = copy.deepcopy(samples)
    start = time.perf_counter()
    run(todo)
    cuda_sync()
    wall = time.perf_counter() - start
    failed = [s.reason for s in todo if not s.alive]
    if failed:
        raise SystemExit(f"caption failed: {failed[0]}")
    out_tokens = sum(s.caption.output_tokens for s in todo)
    in_tokens = sum(s.caption.prompt_tokens for s in todo)
    return {"batch": batch, "images": len(todo), "images_per_s": len(todo) / wall, "tokens_per_s": out_tokens / wall,
            "prompt_tokens": in_tokens / len(todo), "wall_s": wall}



def main(argv: list[str]) -> int:
    args = parse(argv)
    import torch

    tokens = args.tokens or (250 if args.real_size else 64)
    if args.backend:
        return caption_backends.compare(args, tokens)
    samples = make_samples(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        engine = real_size_engine() if args.real_size else tiny_engine(Path(args.cache_dir or tmp), args.threads)
        device = torch.cuda.get_device_name() if args.real_size else f"cpu, {args.threads} thread(s)"
        print(f"caption stage: {engine.model} on {engine.backend} ({device}); "
              f"{tokens} output tokens per image (fixed)")
        baseline = measure(caption_stage(engine, 1, tokens), samples[: max(2, args.images // 4)], 1)
        batched = measure(caption_stage(engine, args.batch, tokens), samples, args.batch)
        engine.close()
    for r in (baseline, batched):
        print(f"  batch {r['batch']:>3}: {r['images_per_s']:8.2f} images/s  {r['tokens_per_s']:9.1f} "
              f"output tokens/s  (mean prompt {r['prompt_tokens']:.0f} tokens incl. image; "
              f"{r['images']} images in {r['wall_s']:.1f} s)")
    print(f"  batching speed-up over one image per call: {batched['images_per_s'] / baseline['images_per_s']:.2f}x")
    if args.real_size:
        gpu = next((k for k in ROOFLINE_IMAGES_PER_S if k in torch.cuda.get_device_name()), None)
        if gpu and tokens == 250:
            share = batched["images_per_s"] / ROOFLINE_IMAGES_PER_S[gpu]
            print(f"  vs the {gpu} roofline of {ROOFLINE_IMAGES_PER_S[gpu]} images/s: {share:.0%}")
    return 0
