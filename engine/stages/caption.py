"""Caption stage: each sample's fusion prompt and image → the caption engine, in batches."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from pathlib import Path

from engine.core.config import ApiConfig, CaptionConfig, RunConfig, RuntimeConfig, SglangConfig
from engine.core.models import resolve_model
from engine.core.placement import CaptionNeed, count_params, rest_fraction
from engine.core.record import Sample
from engine.core.runtime import StageFailed
from engine.core.stage import ImageView, Resources, Stage
from engine.io.object_output import local_companion
from models.caption.base import CaptionEngine, EngineDead, SamplingParams
from models.caption.families import family_of_folder, require_backend
from models.caption.figures import CaptionTally, GpuSampler
from models.caption.registry import load_engine, prepare_backend, resolve_backend
from models.errors import ConfigError

JOURNAL = Path("journal") / "openai.jsonl"  # under OUT: captions an endpoint was paid for


def build(cfg: RunConfig) -> CaptionStage:
    return CaptionStage(cfg.caption, cfg.runtime, api=cfg.api, sglang=cfg.sglang)


def sampling_params(config: CaptionConfig) -> SamplingParams:
    return SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                          top_p=config.top_p, min_new_tokens=config.min_new_tokens)


def backend_settings(backend: str, config: CaptionConfig, api: ApiConfig, sglang: SglangConfig, out: str,
                     cache_dir: str = ""):
    """The settings object ``backend`` (resolved) takes, from the run's options; the engine
    decides where in the output folder a backend's journal goes, and where SGLang keeps what it
    builds (converted checkpoints, the CPU stub): ``cache_dir``."""
    if backend == "transformers":
        from models.caption.transformers_backend import TransformersSettings

        return TransformersSettings(batch_size=config.caption_batch, decode=config.caption_decode,
                                    dtype=config.caption_dtype, cpu_threads=config.caption_cpu_threads)
    if backend == "sglang":
        from models.caption.sglang_backend import SglangSettings

        return SglangSettings(dp_size=sglang.sglang_dp_size, tp_size=sglang.sglang_tp_size,
                              dummy_weights=sglang.sglang_dummy_weights, radix_cache=sglang.sglang_radix_cache,
                              mem_fraction=sglang.sglang_mem_fraction, window=sglang.sglang_window,
                              max_total_tokens=sglang.sglang_max_total_tokens, cache_dir=cache_dir,
                              dtype=config.caption_dtype)
    from models.caption.openai_backend import ApiSettings

    return ApiSettings(base=api.api_base, model=api.api_model, concurrency=api.api_concurrency,
                       max_retries=api.api_max_retries, timeout=api.api_timeout, backoff=api.api_backoff,
                       max_backoff=api.api_max_backoff, image_detail=api.api_image_detail,
                       jpeg_quality=api.api_jpeg_quality,
                       journal=str(local_companion(out, cache_dir) / JOURNAL) if api.api_journal and out else "")


class CaptionStage(Stage):
    name = "caption"

    def __init__(self, config: CaptionConfig, runtime: RuntimeConfig, *,
                 api: ApiConfig = ApiConfig(), sglang: SglangConfig = SglangConfig()):
        self.device = runtime.device  # already resolved from "auto" by the pipeline
        self.cache_dir = Path(runtime.cache_dir)
        self.ref, folder = None, ""  # remote (openai): nothing to load; the model is the endpoint's
        if config.caption_backend != "openai":
            self.ref = resolve_model("caption", config.caption_model, runtime)
            if self.ref is None:
                raise ConfigError("--caption-model is empty: name a caption checkpoint (folder or hub id)")
            if self.ref.is_local:  # a hub id's config is read when it loads, still before any sample
                folder = str(self.ref.resolve(self.cache_dir))
        # Settled now (auto: for the checkpoint's family), so a missing SGLang or endpoint, or a
        # family the backend cannot serve, fails before any work.
        backend = resolve_backend(config.caption_backend, self.device, folder)
        if folder:
            require_backend(family_of_folder(folder, self.ref.name), backend, self.ref.name)
        self.config = dataclasses.replace(config, caption_backend=backend)
        self.settings = backend_settings(backend, config, api, sglang, runtime.out, runtime.cache_dir)
        if backend == "openai":
            self.settings.require_endpoint()
        self.model_name = api.api_model if self.ref is None else self.ref.name
        prepare_backend(backend, self.device, self.settings)  # here: the main thread, before any work
        self.engine: CaptionEngine | None = None
        self.tally = CaptionTally()
        self._figures_lock = threading.Lock()
        self.gpu = GpuSampler()
        self.engine_figures: dict[str, float] = {}

    def views(self) -> tuple[ImageView, ...]:
        return (ImageView("caption", self.config.caption_max_side),)

    def resources(self) -> Resources:
        # SGLang and remote endpoints keep a window of requests in flight inside one
        # generate() call: a batch smaller than the window would leave it part empty.
        # transformers sorts its window by prompt length and generates it batch by batch.
        # Those two also take two batches at once, so the next one tops up the window while
        # the last requests of the one before finish (transformers: one batch, one GPU model).
        window, workers = {"sglang": lambda: (self.settings.window, 2),
                           "openai": lambda: (self.settings.concurrency, 2),
                           "transformers": lambda: (self.config.caption_batch * self.config.caption_sort_window, 1),
                           }[self.config.caption_backend]()
        return Resources(batch_size=max(self.config.caption_batch, window), device=self.device, workers=workers)

    def setup(self) -> None:
        path = self.settings.base if self.ref is None else self.ref.resolve(self.cache_dir)
        self.engine = load_engine(self.config.caption_backend, self.model_name, path, self.device, self.settings)

    def process(self, batch: list[Sample]) -> list[Sample]:
        ready = []
        for sample in batch:
            if not sample.prompt:
                sample.fail(self.name, "no fusion prompt: run the prompt stage before caption")
            elif "caption" not in sample.views:
                sample.fail(self.name, "no decoded 'caption' view")
            else:
                ready.append(sample)
        if not ready:
            return batch
        start = time.perf_counter()
        try:
            captions = self.engine.generate(
                [s.prompt for s in ready],
                [s.views["caption"] for s in ready],
                params=sampling_params(self.config),
            )
        except EngineDead as exc:  # not this batch's fault: stop, leaving its shard uncommitted
            raise StageFailed(f"caption engine failed: {exc}") from exc
        with self._figures_lock:  # process() may run on two threads (resources().workers)
            self.tally.add(captions, time.perf_counter() - start)
            self.gpu.maybe_sample()
        for sample, caption in zip(ready, captions, strict=True):
            if caption.finish_reason == "error":
                sample.fail(self.name, caption.text)
            else:
                sample.caption = caption
        return batch

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine_figures = getattr(self.engine, "metrics", dict)()
            self.engine.close()
            self.engine = None

    def metrics(self) -> dict[str, float]:
        """Tokens/s, images/s, the backend's own figures (retries, prefix-cache hits), GPU. Safe to
        call while ``process`` runs (the live metrics endpoint does): the engine's figures live,
        its last ones after teardown."""
        engine = self.engine  # teardown may clear it meanwhile
        with self._figures_lock:
            figures = {**self.tally.figures(), **self.gpu.figures()}
        return {**figures, **(engine.metrics() if engine else self.engine_figures)}

    def progress(self) -> dict[str, str]:
        """Prompt and output tokens/s, the prefix-cache hit rate where the backend reports it,
        GPU memory and utilisation (the engines' counters have fixed keys: safe to read live)."""
        engine = self.engine  # teardown may clear it meanwhile
        with self._figures_lock:  # process() adds to the tally and the GPU figures meanwhile
            figures = {**self.tally.figures(), **self.gpu.figures()}
        figures.update(engine.metrics() if engine else self.engine_figures)  # the last, after teardown
        live = {}
        if "output_tokens_per_s" in figures:
            live["prompt tok/s"] = f"{figures['prompt_tokens_per_s']:.0f}"
            live["out tok/s"] = f"{figures['output_tokens_per_s']:.0f}"
        if "prefix_cache_hit_rate" in figures:
            live["prefix hit"] = f"{figures['prefix_cache_hit_rate']:.0%}"
        memory = [v for k, v in figures.items() if k.endswith("_memory_peak_gib")]
        util = [v for k, v in figures.items() if k.endswith("_mean_util_percent")]
        if memory:
            live["gpu"] = f"{max(memory):.1f} GiB, {sum(util) / len(util):.0f}%"
        return live

    def describe(self) -> str:
        backend = self.engine.backend if self.engine else self.config.caption_backend
        return f"{self.name} ({self.model_name}, {backend}, {self.device})"


TEXT_TOKENS = 400  # fusion prompt text (instruction, alt text, boxes, OCR) in LLaVA tokens (estimate)


def backend_of(cfg: RunConfig) -> str:
    """The backend ``auto`` settles to on this node, for the checkpoint's family."""
    return resolve_backend(cfg.caption.caption_backend, cfg.runtime.device, cfg.caption.caption_model)


def replicated(cfg: RunConfig) -> bool:
    """A runtime replica per device when the engine runs in this process on one device (SGLang
    spans the GPUs itself; an endpoint is remote)."""
    return backend_of(cfg) == "transformers"


def settled(cfg: RunConfig, stages: tuple[str, ...]) -> RunConfig:
    """``--sglang-mem-fraction`` settled for SGLang: the option when set, else what the experts on
    the tightest GPU leave (engine/core/placement.py)."""
    if backend_of(cfg) != "sglang" or cfg.sglang.sglang_mem_fraction:
        return cfg
    fraction = rest_fraction(cfg, stages)
    return dataclasses.replace(cfg, sglang=dataclasses.replace(cfg.sglang, sglang_mem_fraction=fraction))


@functools.lru_cache(maxsize=8)
def caption_need(cfg: RunConfig, node: bool = False) -> CaptionNeed:
    """The caption engine's weights, KV cache per token and longest request, for its family
    (models/caption/families.py): image tokens at the checkpoint's own image budget. ``node``:
    for this node, whose backend ``auto`` settles (else the card's engine on a GPU node: SGLang)."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText

    from models.caption.families import LLAVA_1_6, family_of_folder
    from models.tiny import LLAVA_NEXT_7B, llava_next_parts

    model = cfg.caption.caption_model
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        family = family_of_folder(path, model)
        config, source, folder = getattr(transformers, family.hf_config).from_pretrained(path), "config.json", path
    elif model.startswith("llava-hf/llava-v1.6-") and "7b" in model:
        family, config, source, folder = LLAVA_1_6, llava_next_parts(LLAVA_NEXT_7B)[0], f"known config of {model}", None
    else:
        raise ConfigError(f"plan: --caption-model {model}: pass a local folder with config.json")
    with torch.device("meta"):
        net = AutoModelForImageTextToText.from_config(config)
    text = config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * 2  # K and V, bfloat16
    image_tokens = family.max_image_tokens(config, folder)
    backend = backend_of(cfg) if node else cfg.caption.caption_backend
    if backend == "auto":  # the card's engine on a GPU node, for a family SGLang serves
        backend = "transformers" if family.sglang_refusal else "sglang"
    tp = cfg.sglang.sglang_tp_size if backend == "sglang" else 1  # transformers: one GPU per replica
    return CaptionNeed(f"{model} ({backend})", backend, count_params(net), 2 * count_params(net), kv_per_token,
                       image_tokens + TEXT_TOKENS + cfg.caption.max_new_tokens, cfg.caption.caption_batch, source,
                       tp, kv_heads, own_processes=backend == "sglang")
