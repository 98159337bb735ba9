"""Caption backends side by side on the same inputs, in one run (``python -m bench caption --backend``).

    python -m bench caption --backend transformers openai --images 16 --tokens 32
    python -m bench caption --backend transformers sglang --real-size      # on a GPU

Every backend captions the same samples (``bench.caption.make_samples``) through the
production caption stage at a fixed output length (min = max new tokens), after a warm-up
pass. ``transformers`` is the tiny LLaVA-NeXT on the CPU, or LLaVA-1.6-7B with random
weights on a GPU with ``--real-size``. ``openai`` without ``--api-base`` runs against a local
fake chat-completions server (``bench/_chat_server.py``) answering after ``--fake-latency``
seconds, every ``--fake-slow-every``-th request four times slower (long captions take
longer): it measures the client (JPEG encoding, concurrency, HTTP), not a model. ``sglang``
serves the tiny model on the CPU (converted into the native LLaVA layout, as a run does; CPU
figures check the wiring — same inputs, tokens, prefix-cache hits — not speed), or with
``--real-size`` loads ``--sglang-model`` on the GPUs (a LLaVA-1.6-7B checkpoint folder, weights
random with ``load_format=dummy``). Its rows print SGLang's prefix-cache hit rate.

The window-keeping backends (openai, sglang) get a batch of ``--concurrency`` requests and
two rows: one batch at a time (the window drains at each batch's end) and two at a time, as
the caption stage runs them (the next batch tops the window up).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

BACKENDS = ("transformers", "openai", "sglang")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
                        help="compare these caption backends on the same inputs (first = baseline)")
    parser.add_argument("--api-base", default="", help="openai: endpoint (default: a local fake server)")
    parser.add_argument("--api-model", default="bench", help="openai: model name")
    parser.add_argument("--concurrency", type=int, default=16, help="openai, sglang: requests in flight")
    parser.add_argument("--fake-latency", type=float, default=0.2,
                        help="openai without --api-base: seconds the fake server takes per request")
    parser.add_argument("--fake-slow-every", type=int, default=4,
                        help="openai without --api-base: every N-th request takes 4x --fake-latency (0: none)")
    parser.add_argument("--sglang-model", default="",
                        help="sglang: checkpoint folder (default: the tiny model; real size needs one)")


def build_engine(backend: str, args: argparse.Namespace, cache_dir: Path, stack: contextlib.ExitStack):
    """The loaded engine for ``backend`` and a label saying what it ran against."""
    from bench.caption import real_size_engine, tiny_engine

    if backend == "transformers":
        engine = real_size_engine(args.batch) if args.real_size else tiny_engine(cache_dir, args.threads, args.batch)
        return engine, f"transformers ({engine.model}, {engine.device})"
    from engine.core.config import ApiConfig, CaptionConfig, SglangConfig
    from engine.stages.caption import backend_settings

    if backend == "openai":
        from models.caption.openai_backend import OpenAIEngine

        base, label = args.api_base, f"openai ({args.api_base})"
        if not base:
            from bench._chat_server import ChatServer

            slow = ("ok",) * (args.fake_slow_every - 1) + (f"slow:{4 * args.fake_latency}",)
            server = stack.enter_context(ChatServer(latency=args.fake_latency, output_words=args.tokens,
                                                    chaos=slow if args.fake_slow_every > 0 else ()))
            base, label = server.url, f"openai (local fake server, {args.fake_latency}s/request)"
        cfg = ApiConfig(api_base=base, api_model=args.api_model, api_concurrency=args.concurrency)
        cfg.validate()
        return OpenAIEngine(backend_settings("openai", CaptionConfig(), cfg, SglangConfig(), out="")), label
    from engine.core.config import RuntimeConfig
    from engine.core.models import resolve_model
    from models.caption.sglang_backend import SglangEngine

    path = args.sglang_model or resolve_model("caption", "tiny", RuntimeConfig(cache_dir=str(cache_dir))).resolve(cache_dir)
    cfg = SglangConfig(sglang_dummy_weights=args.real_size, sglang_window=args.concurrency)
    cfg.validate()
    device = "cuda" if args.real_size else "cpu"
    settings = backend_settings("sglang", CaptionConfig(), ApiConfig(), cfg, out="", cache_dir=str(cache_dir))
    engine = SglangEngine(settings, path, device)
    return engine, f"sglang ({Path(path).name}{', dummy weights' if args.real_size else ''}, {device})"


def compare(args: argparse.Namespace, tokens: int) -> int:
    from bench.caption import caption_stage, make_samples, measure

    samples = make_samples(args.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backend:
            with contextlib.ExitStack() as stack:
                engine, label = build_engine(backend, args, Path(args.cache_dir or tmp), stack)
                try:
                    if backend == "transformers":
                        result = measure(caption_stage(engine, args.batch, tokens), samples, args.batch)
                        result["extra"] = engine.metrics()
                        rows.append((label, result))
                        continue
                    # a window-keeping backend is handed a batch as large as its window
                    batch = max(args.batch, args.concurrency)
                    for workers, how in ((1, "one batch at a time"), (2, "two batches at a time")):
                        result = measure(caption_stage(engine, batch, tokens), samples, batch, workers)
                        result["extra"] = {}
                        rows.append((f"{label}, {how}", result))
                    rows[-1][1]["extra"] = engine.metrics()
                finally:
                    engine.close()
    print(f"{len(samples)} images, {tokens} output tokens each (fixed)")
    if not args.real_size:
        print("  (tiny model on the CPU: these figures check the wiring, not the speed of a GPU run)")
    print(f"  {'backend':<72} {'images/s':>9} {'out tok/s':>10} {'vs first':>9}")
    base = rows[0][1]["images_per_s"]
    for label, r in rows:
        print(f"  {label:<72} {r['images_per_s']:>9.2f} {r['tokens_per_s']:>10.1f} {r['images_per_s'] / base:>8.2f}x")
        extra = {k: round(v, 3) for k, v in r["extra"].items()}
        if extra:
            print(f"  {'':<72} {extra}")
    return 0
