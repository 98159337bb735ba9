"""Caption stage throughput (images/s, tokens/s at a fixed output length): batched calls and
length-sorted windows with dynamic, static or compiled decoding, against one image per call.

``python -m bench caption`` runs the tiny LLaVA-NeXT on the CPU through the caption stage
(the production loading path); ``--real-size`` builds LLaVA-1.6-7B (Vicuna) from its config
with random weights directly on the GPU (bf16, SDPA): the same cost as real weights, no
download. Every request generates exactly ``--tokens`` tokens (min = max new tokens).

Rows, all in one run on the same samples (mixed image sizes and prompt lengths):

* one image per call: the baseline of batching;
* ``--batch`` images per call in arrival order with the library's dynamic KV cache: the
  transformers backend before length sorting and static caches ("before");
* a window of ``--window`` batches sorted by prompt length, once per ``--decode`` mode
  (dynamic, static KV cache, compiled decoding step): "after".

Each row runs its samples once untimed first, so compiling and cache allocation are paid
before the clock starts (the warm-up time is printed: it is what compiling costs a run).
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
from engine.core.config import CAPTION_DECODE_MODES

# DESIGN.md: LLaVA-1.6-7B, ~3,200 prompt tokens, 250 output tokens, roofline per GPU
ROOFLINE_IMAGES_PER_S = {"H100": 4.5, "A100": 2.4}
# (height, width): mixed aspect ratios, so AnyRes picks different grids (and token counts)
SIZES = ((600, 800), (1024, 683), (512, 1024), (900, 900), (336, 1344), (480, 480), (1344, 768))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench caption", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="images per measured run")
    parser.add_argument("--batch", type=int, default=8, help="images per generation call")
    parser.add_argument("--window", type=int, default=4,
                        help="batches sorted together by prompt length (the --caption-sort-window)")
    parser.add_argument("--decode", nargs="+", choices=CAPTION_DECODE_MODES, default=list(CAPTION_DECODE_MODES),
                        help="decode modes measured with the sorted window")
    parser.add_argument("--tokens", type=int, default=None,
                        help="output tokens per image (default: 64 tiny, 250 real size)")
    parser.add_argument("--real-size", action="store_true",
                        help="LLaVA-1.6-7B with random weights on a GPU instead of the tiny model")
    parser.add_argument("--cache-dir", default="", help="tiny model cache (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    caption_backends.add_arguments(parser)
    return parser.parse_args(argv)


def make_samples(n: int):
    """``n`` samples whose prompts vary the way web data does: 0-11 boxes, 0-3 OCR lines,
    short or long alt text, images of several aspect ratios."""
    from engine.core.record import Sample, Source
    from engine.evidence.prompt import fusion_prompt
    from models.records import Box, OcrLine

    rng = np.random.default_rng(0)
    boxes = [Box(f"object {i}", 0.9, (0.05 * i, 0.1, 0.05 * i + 0.2, 0.5), "owlv2") for i in range(12)]
    ocr = [OcrLine("GRAND OPENING", 0.99, (0.1, 0.1, 0.9, 0.2)), OcrLine("FRESH BREAD DAILY", 0.98, (0.1, 0.3, 0.9, 0.4)),
           OcrLine("OPEN 7 DAYS A WEEK FROM 6AM", 0.97, (0.1, 0.5, 0.9, 0.6))]
    samples = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        alt = f"a bakery storefront, photo {i}" + (", with a long descriptive alt text" * 6 if i % 3 == 0 else "")
        sample = Sample(key=f"{i:06d}", source=Source("bench", "bench", str(i)), alt_text=alt)
        sample.views["caption"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sample.prompt = fusion_prompt(alt, boxes[: (i * 5) % 13], ocr[: i % 4])
        samples.append(sample)
    return samples


def tiny_engine(cache_dir: Path, threads: int, batch: int):
    """The tiny LLaVA-NeXT through the production loader (saved folder → from_pretrained)."""
    from engine.core.config import ApiConfig, CaptionConfig, RuntimeConfig, SglangConfig
    from engine.core.models import resolve_model
    from engine.stages.caption import backend_settings
    from models.caption.registry import load_engine

    config = CaptionConfig(caption_cpu_threads=threads, caption_batch=batch)
    path = resolve_model("caption", "tiny", RuntimeConfig(cache_dir=str(cache_dir))).resolve(cache_dir)
    settings = backend_settings("transformers", config, ApiConfig(), SglangConfig(), out="")
    return load_engine("transformers", "tiny", path, "cpu", settings)


def real_size_engine(batch: int):
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
    return TransformersCaptionEngine("llava-v1.6-7b-random", processor, net.eval(), "cuda",
                                     batch_size=batch, decode="compiled")


def caption_stage(engine, batch: int, tokens: int):
    """The production caption stage around an engine that is already loaded."""
    from engine.core.config import CaptionConfig, RuntimeConfig
    from engine.stages.caption import CaptionStage

    # The stage only wraps ``engine``: the checkpoint it checks when built (family, hub) is the tiny
    # twin's, found offline and never loaded, whatever ``engine`` serves (a 7B, an endpoint's model).
    config = CaptionConfig(caption_model="tiny", caption_batch=batch, max_new_tokens=tokens, min_new_tokens=tokens)
    runtime = RuntimeConfig(out="unused", models="tiny", device=engine.device)
    stage = CaptionStage(config, runtime)
    stage.engine = engine
    return stage


def measure(stage, samples, batch: int, workers: int = 1) -> dict:
    """``stage.process`` over ``samples`` in calls of ``batch``, ``workers`` calls at a time
    (as the runtime runs them), after one untimed pass."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    def run(todo):
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(stage.process, [todo[i:i + batch] for i in range(0, len(todo), batch)]))
        return todo

    start = time.perf_counter()
    run(copy.deepcopy(samples))  # warm-up: kernels, allocator, compiling, static caches
    cuda_sync()
    warmup = time.perf_counter() - start
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
            "prompt_tokens": in_tokens / len(todo), "wall_s": wall, "warmup_s": warmup}


def variant(engine, batch: int, decode: str):
    """The same loaded model behind other batching and decoding options."""
    from models.caption.transformers_backend import TransformersCaptionEngine

    return TransformersCaptionEngine(engine.model, engine.processor, engine.net, engine.device,
                                     batch_size=batch, decode=decode)


def rows(engine, samples, args, tokens: int) -> list[tuple[str, dict]]:
    """(label, figures) per row: batch 1, the batch in arrival order, the sorted window per mode."""
    plans = [("1 per call, dynamic", 1, 1, "dynamic", samples[: max(2, len(samples) // 4)]),
             (f"{args.batch} per call, arrival order, dynamic", args.batch, 1, "dynamic", samples)]
    plans += [(f"{args.batch} per call, window of {args.window} sorted, {decode}", args.batch, args.window, decode,
               samples) for decode in args.decode]
    results = []
    for label, batch, window, decode, todo in plans:
        run = variant(engine, batch, decode)
        result = measure(caption_stage(run, batch, tokens), todo, batch * window)
        result["padding_share"] = run.metrics().get("padding_share", 0.0)
        results.append((label, result))
    return results


def real_size_padding(samples, batch: int, window: int) -> tuple[float, float, float]:
    """Left-padding share of the prompt batches for LLaVA-1.6-7B's own processor, in arrival
    order and in sorted windows, and the share of prefill tokens sorting saves. Token counts
    need no weights, so this real-size figure is computed on any machine."""
    from models.caption.transformers_backend import length_sorted_batches, prompt_lengths
    from models.tiny import LLAVA_NEXT_7B, llava_next_parts

    _, processor = llava_next_parts(LLAVA_NEXT_7B)
    lengths = prompt_lengths(processor, [s.prompt for s in samples], [s.views["caption"] for s in samples])

    def padded(size: int) -> tuple[int, int]:
        """(prompt tokens incl. padding, padding) over windows of ``size``."""
        total = padding = 0
        for start in range(0, len(lengths), size):
            for chunk in length_sorted_batches(lengths[start:start + size], batch):
                longest = max(lengths[start + i] for i in chunk)
                total += longest * len(chunk)
                padding += sum(longest - lengths[start + i] for i in chunk)
        return total, padding

    (arrival, arrival_pad), (ordered, ordered_pad) = padded(batch), padded(batch * window)
    return arrival_pad / arrival, ordered_pad / ordered, 1 - ordered / arrival


def main(argv: list[str]) -> int:
    args = parse(argv)
    import torch

    tokens = args.tokens or (250 if args.real_size else 64)
    if args.backend:
        return caption_backends.compare(args, tokens)
    samples = make_samples(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        engine = (real_size_engine(args.batch) if args.real_size
                  else tiny_engine(Path(args.cache_dir or tmp), args.threads, args.batch))
        device = torch.cuda.get_device_name() if args.real_size else f"cpu, {args.threads} thread(s)"
        print(f"caption stage: {engine.model} on {engine.backend} ({device}); "
              f"{tokens} output tokens per image (fixed)")
        results = rows(engine, samples, args, tokens)
        engine.close()
    before = results[1][1]["images_per_s"]
    print(f"  {'':<44} {'images/s':>9} {'out tok/s':>10} {'padding':>8} {'warm-up':>8} {'vs arrival':>10}")
    for label, r in results:
        print(f"  {label:<44} {r['images_per_s']:>9.2f} {r['tokens_per_s']:>10.1f} {r['padding_share']:>8.1%} "
              f"{r['warmup_s']:>7.1f}s {r['images_per_s'] / before:>9.2f}x")
    print(f"  mean prompt {results[1][1]['prompt_tokens']:.0f} tokens incl. the image; padding = share of the "
          f"prompt batches that is left padding; warm-up = the untimed first pass (incl. compiling)")
    if not args.real_size:
        arrival, ordered, saved = real_size_padding(samples, args.batch, args.window)
        print(f"  at real size (LLaVA-1.6-7B's processor, token counts only): prompt batches are {arrival:.1%} "
              f"padding in arrival order, {ordered:.1%} sorted; sorting saves {saved:.1%} of prefill tokens")
    if args.real_size:
        gpu = next((k for k in ROOFLINE_IMAGES_PER_S if k in torch.cuda.get_device_name()), None)
        best = max(r["images_per_s"] for _, r in results)
        if gpu and tokens == 250:
            print(f"  best row vs the {gpu} roofline of {ROOFLINE_IMAGES_PER_S[gpu]} images/s: "
                  f"{best / ROOFLINE_IMAGES_PER_S[gpu]:.0%}")
    return 0
