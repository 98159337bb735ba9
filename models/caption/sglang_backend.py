"""Caption engine running SGLang in process (written against sglang 0.5.23).

One ``sglang.Engine`` spans the node's GPUs (data parallel, optionally tensor parallel
inside each replica), or runs on the CPU (one replica; CI and setup checks). It serves LLaVA
through SGLang's native classes, so the radix cache is on: a llava-hf LLaVA-NeXT checkpoint is
converted once into the original LLaVA layout (``models/caption/llava_native.py``), and a
multimodal checkpoint SGLang would serve through its Transformers fallback (radix cache off)
is refused before any work. A request's text is the one every backend sends
(``models/caption/chat.py``: the checkpoint's chat template around the prompt and the image);
the radix cache shares what that template puts before the image (llava-hf's LLaVA-NeXT
templates put the image first, as LLaVA's training does, so only the turn's head). Images go
in as PNG bytes (lossless; a PIL image would take SGLang's video branch and skip AnyRes), and
requests stay in flight continuously: ``generate`` hands its batch to a
:class:`~models.caption.window.RequestWindow` that admits a new request as soon as one
finishes, across batches and the caption stage's two calling threads.

A dead engine child is an error of the whole engine, not of a sample: SGLang's child
processes (and its subprocess watchdog) signal the parent with SIGQUIT, whose default
handlers kill the parent. :func:`on_child_failure` replaces them (installed on the main thread
by :func:`prepare`, and passed to ``sglang.Engine``): it marks every engine of this process
dead, and their requests in flight end with :class:`EngineDead` instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.caption.base import EngineDead, SamplingParams
from models.caption.chat import chat_text, check_chat_template
from models.caption.families import LLAVA_1_6, CaptionFamily, family_for, require_backend
from models.caption.window import RequestWindow
from models.errors import ConfigError
from models.records import Caption

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SglangSettings:
    """What the engine's ``--sglang-*`` options say (engine/core/config.py explains each)."""

    dp_size: int  # 0: one replica per visible GPU / tp_size
    tp_size: int
    dummy_weights: bool
    radix_cache: bool
    mem_fraction: float  # 0: SGLang's own default (or what the placement settled)
    window: int  # requests in flight in the engine
    max_total_tokens: int  # KV pool in tokens; 0: from mem_fraction (CPU_KV_TOKENS on the CPU)
    cache_dir: str  # where converted checkpoints and the CPU stub are kept
    dtype: str  # --caption-dtype: SGLang runs each family in its own dtype only (families.py)

SGLANG_VERSION = "0.5.23"  # the API this module is written against
CPU_KV_TOKENS = 16384  # the CPU engine's KV pool when --sglang-max-total-tokens is 0
_SUPPRESSED = -1e9  # logit bias of a suppressed token: never chosen (SGLang rejects -inf in JSON)


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


def require_sglang() -> None:
    """An explicit ``--caption-backend sglang`` without SGLang fails before any work."""
    if not sglang_available():
        raise ConfigError(
            f"--caption-backend sglang: SGLang is not installed (pip install "
            f"'densefusion[sglang]', i.e. sglang=={SGLANG_VERSION}), or use --caption-backend "
            f"transformers / auto"
        )


# --- engine death ---------------------------------------------------------------------------

_ENGINES: weakref.WeakSet[SglangEngine] = weakref.WeakSet()


def on_child_failure(signum, frame) -> None:
    """SIGQUIT from an SGLang child (or SGLang's subprocess watchdog): a child died.

    Module level, because SGLang pickles its server arguments, this handler among them, to
    its children. Marks this process's engines dead; their callers then fail cleanly."""
    log.error("sglang: a child process of the engine failed (SIGQUIT)")
    for engine in list(_ENGINES):
        engine.mark_dead("an SGLang child process failed")


def _die_with_parent() -> None:
    """In every process forked from here: SIGKILL when the forking thread's process dies.

    SGLang's scheduler and detokenizer ask for that themselves; the image-preprocessing pool
    it forks in this process does not, so a SIGKILL of the run would leave its workers waiting
    on their queue forever."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the line above
        os._exit(1)


_FORK_HOOK: list[bool] = []  # registered once per process (os.register_at_fork cannot be undone)


def prepare(device: str, settings: SglangSettings) -> None:
    """Run before any work, on the main thread: SGLang's CPU environment (before anything
    imports ``sglang.srt``), the SIGQUIT handler (Python installs handlers only there; the
    engine itself starts on the caption stage's thread), and the rule that processes forked
    from here die with it."""
    require_sglang()
    if device == "cpu":
        from models.caption import sglang_cpu

        sglang_cpu.prepare(Path(settings.cache_dir))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGQUIT, on_child_failure)
    if not _FORK_HOOK and sys.platform == "linux":
        os.register_at_fork(after_in_child=_die_with_parent)
        _FORK_HOOK.append(True)


# --- request building (pure) --------------------------------------------------------------


def sampling_dict(params: SamplingParams, suppress_tokens: tuple[int, ...] = ()) -> dict[str, Any]:
    """SGLang's sampling parameters; ``suppress_tokens`` (the checkpoint's generation config,
    which transformers applies and SGLang does not read) become a logit bias."""
    sampling = {
        "max_new_tokens": params.max_new_tokens,
        "min_new_tokens": params.min_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if suppress_tokens:
        sampling["logit_bias"] = {str(t): _SUPPRESSED for t in suppress_tokens}
    return sampling


def suppressed_tokens(model_path: str) -> tuple[int, ...]:
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text()).get("suppress_tokens") or ())


def png_bytes(image: np.ndarray) -> bytes:
    """The decoded view, losslessly: SGLang decodes it to exactly these pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def generate_request(prompt: str, image: np.ndarray, sampling: dict[str, Any], processor) -> dict[str, Any]:
    """Keyword arguments of ``Engine.async_generate`` for one image: the text every backend
    sends (``processor``: the served checkpoint's, for its chat template). The image goes as
    bytes: sglang 0.5.23 treats a PIL image as a video frame (one tile, no AnyRes), silently."""
    return {"prompt": chat_text(processor, prompt), "image_data": png_bytes(image), "sampling_params": sampling}


def engine_args(cfg: SglangSettings, model_path: str, device: str, n_gpus: int = 0,
                family: CaptionFamily = LLAVA_1_6) -> dict[str, Any]:
    """Keyword arguments of ``sglang.Engine`` (they mirror its ``ServerArgs``) on ``device``:
    ``cpu`` (one replica), ``cuda`` (every visible GPU) or ``cuda:N`` (that GPU), for a checkpoint
    of ``family``."""
    common = {
        "model_path": model_path,
        "load_format": "dummy" if cfg.dummy_weights else "auto",
        "disable_radix_cache": not cfg.radix_cache,
        "dtype": family.sglang_dtype,
        "random_seed": 0,
        "log_level": "error",
        "custom_sigquit_handler": on_child_failure,
    }
    if cfg.max_total_tokens:
        common["max_total_tokens"] = cfg.max_total_tokens
    if device == "cpu":
        return {
            **common, "device": "cpu", "tp_size": 1, "dp_size": 1,
            "attention_backend": "torch_native", "disable_cuda_graph": True, "skip_server_warmup": True,
            "max_total_tokens": cfg.max_total_tokens or CPU_KV_TOKENS,
        }
    first = int(device.partition(":")[2] or 0)
    if n_gpus - first < cfg.tp_size:
        raise ConfigError(
            f"--sglang-tp-size {cfg.tp_size} needs that many GPUs; {n_gpus} visible, "
            f"starting from {device}"
        )
    # cuda: a replica per tp_size GPUs of the node; cuda:N: one replica from GPU N
    replicas = (n_gpus - first) // cfg.tp_size if device == "cuda" else 1
    return {
        **common,
        "tp_size": cfg.tp_size,
        "dp_size": cfg.dp_size or replicas,
        "base_gpu_id": first,
        # 0 = not settled by the placement (engine/core/placement.py): SGLang's own default
        "mem_fraction_static": cfg.mem_fraction or None,
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
        out.get("text", "").strip(),  # as the transformers backend: no edge whitespace
        int(meta.get("prompt_tokens", 0)),
        int(meta.get("completion_tokens", 0)),
        "length" if kind == "length" else "stop",
        seconds,
        model,
        "sglang",
    )


def native_architectures() -> set[str]:
    """Architectures SGLang serves with its own classes (anything else: its Transformers fallback)."""
    # importing the registry imports every model module; the CPU build warns about each that
    # needs a GPU kernel (dozens of lines, none about LLaVA): not the user's concern
    logging.getLogger("sglang.srt.models.registry").setLevel(logging.ERROR)
    from sglang.srt.models.registry import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


# --- the engine -----------------------------------------------------------------------------


class SglangEngine:
    backend = "sglang"

    def __init__(self, cfg: SglangSettings, model_path: str, device: str):
        """``model_path``: a llava-hf LLaVA-NeXT checkpoint (converted once, under
        ``cfg.cache_dir``) or a folder SGLang serves natively; ``device``: cpu, cuda or cuda:N."""
        family = family_for(model_path)
        require_backend(family, self.backend, model_path)
        if cfg.dtype not in ("auto", family.sglang_dtype):
            raise ConfigError(f"--caption-dtype {cfg.dtype} with --caption-backend sglang: SGLang runs "
                              f"{family.name} in {family.sglang_dtype} only (families.py says why); use auto")
        cache_dir = Path(cfg.cache_dir)
        prepare(device, cfg)  # a second call is harmless: the CPU environment is set once
        if threading.current_thread() is not threading.main_thread() and \
                signal.getsignal(signal.SIGQUIT) is not on_child_failure:
            # SGLang's children signal a failure with SIGQUIT, whose default action kills us
            raise RuntimeError("call models.caption.sglang_backend.prepare() on the main thread "
                               "before starting SGLang on another thread")
        import psutil
        import sglang
        from transformers import AutoProcessor

        from models.caption import llava_native

        if sglang.__version__ != SGLANG_VERSION:
            log.warning("sglang %s installed; this backend is written against %s",
                        sglang.__version__, SGLANG_VERSION)
        self.cfg, self.device = cfg, device
        self.model = model_path
        served = llava_native.ensure_native(model_path, cache_dir)
        llava_native.check_native(served, native_architectures())
        self.served = served
        self.processor = AutoProcessor.from_pretrained(served)  # SGLang reads the same files
        check_chat_template(self.processor, model_path)
        self.suppress = suppressed_tokens(served)
        n_gpus = 0
        if device != "cpu":
            import torch

            n_gpus = torch.cuda.device_count()
        args = engine_args(cfg, served, device, n_gpus, family)
        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        log.info("starting sglang.Engine(%s)", args)
        self._engine = sglang.Engine(**args)
        self.child_pids = sorted(p.pid for p in me.children(recursive=True) if p.pid not in before)
        self._window = RequestWindow(cfg.window, "sglang")
        self._dead: str | None = None
        self._closed = False
        self._dead_event = self._window.run(_new_event())
        self._tokens = {"prompt_tokens": 0, "output_tokens": 0, "cached_tokens": 0}
        _ENGINES.add(self)

    def mark_dead(self, reason: str) -> None:
        """Requests in flight and later calls fail with :class:`EngineDead` (any thread)."""
        if self._dead is None:
            self._dead = reason
            self._window.call_soon(self._dead_event.set)

    def generate(
        self, prompts: list[str], images: list[np.ndarray], /, *, params: SamplingParams
    ) -> list[Caption]:
        """Thread-safe: callers in several threads share one window of in-flight requests.
        Raises :class:`EngineDead` when the engine's processes died."""
        if self._dead:
            raise EngineDead(f"sglang engine is dead: {self._dead}")
        return self._window.run(self._generate_all(prompts, images, params))

    async def _generate_all(self, prompts, images, params) -> list[Caption]:
        sampling = sampling_dict(params, self.suppress)  # one dict shared by the batch: SGLang only reads it
        return list(await asyncio.gather(
            *(self._caption(p, im, sampling) for p, im in zip(prompts, images, strict=True))
        ))

    async def _caption(self, prompt: str, image: np.ndarray, sampling: dict) -> Caption:
        # PNG encoding off the loop (zlib releases the GIL): the loop only moves requests
        request = await asyncio.get_running_loop().run_in_executor(
            None, generate_request, prompt, image, sampling, self.processor)
        async with self._window.slot():
            start = time.monotonic()
            out = await self._unless_dead(self._engine.async_generate(**request))
        if isinstance(out, Exception):
            return Caption(f"sglang: {type(out).__name__}: {out}", 0, 0, "error",
                           time.monotonic() - start, self.model, self.backend)
        meta = out.get("meta_info", {})
        self._tokens["prompt_tokens"] += int(meta.get("prompt_tokens", 0))
        self._tokens["output_tokens"] += int(meta.get("completion_tokens", 0))
        self._tokens["cached_tokens"] += int(meta.get("cached_tokens", 0))
        return caption_from_output(out, time.monotonic() - start, self.model)

    async def _unless_dead(self, request):
        """The request's output, or its exception (one request's failure is one sample's);
        raises :class:`EngineDead` as soon as the engine dies (its answer would never come)."""
        task = asyncio.ensure_future(request)
        dead = asyncio.ensure_future(self._dead_event.wait())
        await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            raise EngineDead(f"sglang engine is dead: {self._dead}")
        dead.cancel()
        return task.exception() or task.result()

    def in_flight(self) -> int:
        """Requests SGLang itself holds right now (its tokenizer manager's open requests)."""
        return len(self._engine.tokenizer_manager.rid_to_state)

    def metrics(self) -> dict[str, float]:
        figures = {name: float(n) for name, n in self._tokens.items()}
        if self._tokens["prompt_tokens"]:
            figures["prefix_cache_hit_rate"] = (
                self._tokens["cached_tokens"] / self._tokens["prompt_tokens"]
            )
        return figures

    def close(self) -> None:
        """Shut SGLang down and make sure none of its processes outlives it (by PID)."""
        import psutil

        if self._closed:
            return
        self._closed = True
        _ENGINES.discard(self)
        self._window.close()
        try:
            self._engine.shutdown()
        finally:
            survivors = []
            for pid in self.child_pids:
                try:
                    process = psutil.Process(pid)
                    process.kill()
                    survivors.append(process)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(survivors, timeout=30)


async def _new_event() -> asyncio.Event:
    return asyncio.Event()  # made on the window's loop, the only place it is used


def load(model: str, path: str, device: str, settings: SglangSettings) -> SglangEngine:
    return SglangEngine(settings, path, device)
