"""SGLang for real, on the CPU: the tiny LLaVA-NeXT converted into the native LLaVA layout and
served by ``sglang.Engine``, against the transformers backend on the same images and prompts.

One engine serves the whole module (starting one costs 25-40 s); the test that kills one of
its processes runs last.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from engine.core.config import ApiConfig, CaptionConfig, RuntimeConfig, SglangConfig
from engine.core.record import Sample, Source
from engine.core.runtime import StageFailed
from engine.evidence.prompt import CAPTION_ENGINE_INSTRUCTION
from engine.stages.caption import CaptionStage, backend_settings
from models import tiny
from models.caption.base import EngineDead, SamplingParams
from models.caption.chat import chat_text
from models.caption.registry import load_engine
from models.caption.sglang_backend import SglangEngine, generate_request, sampling_dict, sglang_available

# not importorskip: importing sglang picks its platform, which the CPU engine must set first
pytestmark = [pytest.mark.skipif(not sglang_available(), reason="the sglang extra is not installed"),
              pytest.mark.slow]  # starts SGLang's CPU engine: left out by the quick test command (README)

TOKENS = 12
PARAMS = SamplingParams(max_new_tokens=TOKENS)
TIE_TOLERANCE = 1e-3  # log-probability gap under which two kernels may break a tie either way
# (height, width): aspect ratios that pick each AnyRes grid of the tiny model, and a square
SIZES = ((60, 130), (130, 60), (100, 100), (40, 200), (200, 210), (77, 51), (64, 64), (150, 90))
WINDOW = SglangConfig(sglang_window=4)


def settings(backend: str, sglang: SglangConfig = WINDOW, cache_dir: str = "", **caption):
    """A backend's settings as the caption stage builds them from the run's options."""
    return backend_settings(backend, CaptionConfig(**caption), ApiConfig(), sglang, out="", cache_dir=cache_dir)


def _prompt(i: int) -> str:
    boxes = "\n".join(f"object {j}: [0.{j}0, 0.10, 0.{j + 2}0, 0.50]" for j in range(i % 4))
    return (f"{CAPTION_ENGINE_INSTRUCTION}\n\n[External Information]:\n\n[World Knowledge]: photo {i} of a "
            f"bakery\n\n[Detection Box]:\n\n{boxes}\n\n[OCR]:\n\n\n[IMAGE]:")


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def model_folder(tiny_cache):
    return tiny.ensure("caption", tiny_cache / "tiny")


@pytest.fixture(scope="module")
def engine(model_folder, tiny_cache):
    engine = SglangEngine(settings("sglang", cache_dir=str(tiny_cache)), str(model_folder), "cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(model_folder):
    """The transformers backend on the same tiny model (float32 on the CPU, greedy)."""
    engine = load_engine("transformers", "tiny", str(model_folder), "cpu", settings("transformers", caption_batch=4))
    yield engine
    engine.close()


def _sglang_raw(engine: SglangEngine, prompt: str, image: np.ndarray, **extra) -> dict:
    """One request straight to sglang.Engine, with the backend's own request layout."""
    request = generate_request(prompt, image, sampling_dict(PARAMS, engine.suppress), engine.processor)
    return engine._window.run(engine._engine.async_generate(**request, **extra))


def test_greedy_captions_equal_transformers(engine, reference):
    prompts, images = [_prompt(i) for i in range(len(SIZES))], _images()
    ours = engine.generate(prompts, images, params=PARAMS)
    theirs = reference.generate(prompts, images, params=PARAMS)
    assert all(c.finish_reason != "error" for c in ours), [c.text for c in ours]
    tokenizer = reference.processor.tokenizer
    same = 0
    for prompt, image, a, b in zip(prompts, images, ours, theirs, strict=True):
        assert a.prompt_tokens == b.prompt_tokens  # same text, same AnyRes image tokens
        if a.text == b.text:
            same += 1
            continue
        # Near-tied logits of random weights: at the first differing step, SGLang's own scores of
        # both engines' tokens must be within tolerance of each other.
        out = _sglang_raw(engine, prompt, image, return_logprob=True, top_logprobs_num=5)
        ours_ids = [t for _, t, _ in out["meta_info"]["output_token_logprobs"]]
        theirs_ids = tokenizer(b.text, add_special_tokens=False)["input_ids"]
        step = next(i for i, (x, y) in enumerate(zip(ours_ids, theirs_ids)) if x != y)
        top = {t: lp for lp, t, _ in out["meta_info"]["output_top_logprobs"][step]}
        assert theirs_ids[step] in top and abs(top[ours_ids[step]] - top[theirs_ids[step]]) < TIE_TOLERANCE
    assert same >= 0.9 * len(prompts), f"{same} of {len(prompts)} captions equal"


def test_first_token_logprobs_equal_transformers(engine, reference):
    """What catches an image reaching SGLang in a form that skips AnyRes."""
    import torch

    processor, net = reference.processor, reference.net
    suppress = list(net.generation_config.suppress_tokens or [])
    for i, image in enumerate(_images()):
        inputs = processor(text=[chat_text(processor, _prompt(i))], images=[image], return_tensors="pt")
        with torch.inference_mode():
            logits = net(**inputs).logits[0, -1].float()
            logits[suppress] = float("-inf")
            expected = torch.log_softmax(logits, dim=-1)
        out = _sglang_raw(engine, _prompt(i), image, return_logprob=True, top_logprobs_num=5)
        top = out["meta_info"]["output_top_logprobs"][0]
        assert top[0][1] == int(expected.argmax())
        for logprob, token, _ in top:
            # SGLang runs LLaVA in float16: measured gap to transformers (float32) ~1e-3 on these images
            assert logprob == pytest.approx(float(expected[token]), abs=5e-3), (i, token)


def test_requests_after_the_first_reuse_the_cached_head_of_the_chat_text(engine, reference):
    """SGLang's own cached_tokens are the text before the image that an earlier request shared
    (with the tiny model's llava-hf template, image first: the turn's head), and the hit rate
    follows from the token counts."""
    engine._window.run(engine._engine.tokenizer_manager.flush_cache())
    processor = reference.processor
    prompts, images = [_prompt(i) for i in range(4)], _images()[:4]
    start = engine.metrics()
    cached, total = [], []
    for prompt, image in zip(prompts, images, strict=True):  # one at a time: each sees those before
        before = engine.metrics()
        engine.generate([prompt], [image], params=PARAMS)
        after = engine.metrics()
        cached.append(after["cached_tokens"] - before.get("cached_tokens", 0))
        total.append(after["prompt_tokens"] - before.get("prompt_tokens", 0))
    # what is cached: the longest run of tokens before <image> shared with an earlier request
    ids = [processor.tokenizer(chat_text(processor, p).split(processor.image_token)[0])["input_ids"] for p in prompts]
    shared = [0] + [max(len(os.path.commonprefix([ids[i], ids[j]])) for j in range(i)) for i in range(1, 4)]
    assert shared[1] > 0 and all(s - 1 <= c <= s for s, c in zip(shared, cached, strict=True)), (shared, cached)
    rate = (after["cached_tokens"] - start.get("cached_tokens", 0)) / (after["prompt_tokens"] - start.get("prompt_tokens", 0))
    assert rate == pytest.approx(sum(shared) / sum(total), abs=4 / sum(total))
    assert after["prefix_cache_hit_rate"] == after["cached_tokens"] / after["prompt_tokens"] > 0


def test_the_window_bounds_what_sglang_holds_in_flight(engine):
    import threading

    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(engine.in_flight())
            stop.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        n = 3 * engine.cfg.window
        captions = engine.generate([_prompt(i) for i in range(n)], (_images() * 2)[:n], params=PARAMS)
    finally:
        stop.set()
        watcher.join()
    assert all(c.finish_reason != "error" for c in captions)
    assert max(seen) == engine.cfg.window  # observed full, never over


def _stage(engine: SglangEngine, tmp_path) -> CaptionStage:
    stage = CaptionStage(CaptionConfig(caption_backend="sglang", max_new_tokens=64),
                         RuntimeConfig(out=str(tmp_path), device="cpu", models="tiny",
                                       cache_dir=str(tmp_path)))
    stage.engine = engine
    return stage


def _samples(n: int) -> list[Sample]:
    samples = []
    for i, image in enumerate(_images()[:n]):
        sample = Sample(key=f"{i:03d}", source=Source("s", "s", str(i)))
        sample.prompt, sample.views["caption"] = _prompt(i), image
        samples.append(sample)
    return samples


def test_an_aborted_request_rejects_its_sample_with_the_reason(engine, tmp_path):
    import threading

    manager = engine._engine.tokenizer_manager
    stop = threading.Event()

    def abort_the_first():
        while not stop.is_set():
            for rid, state in list(manager.rid_to_state.items()):
                if state.dispatched:  # the scheduler has it (an abort before that is dropped)
                    engine._window.call_soon(lambda rid=rid: manager.abort_request(rid))  # on SGLang's loop
                    return
            stop.wait(0.001)

    aborter = threading.Thread(target=abort_the_first)
    aborter.start()
    try:
        batch = _stage(engine, tmp_path).process(_samples(3))
    finally:
        stop.set()
        aborter.join()
    rejected = [s for s in batch if not s.alive]
    assert len(rejected) == 1 and "abort" in rejected[0].reason and rejected[0].stage == "caption"
    assert all(s.caption and s.caption.text for s in batch if s.alive) and len(batch) == 3


def test_a_dead_engine_child_fails_the_stage_and_leaves_no_process(engine, tmp_path):
    """Runs last: it kills the module's engine."""
    import psutil

    pids = list(engine.child_pids)
    assert pids and all(psutil.pid_exists(p) for p in pids)
    scheduler = next(p for p in pids if "scheduler" in " ".join(psutil.Process(p).cmdline() + [psutil.Process(p).name()]))
    os.kill(scheduler, signal.SIGKILL)
    stage = _stage(engine, tmp_path)
    with pytest.raises(StageFailed, match="caption engine failed"):
        stage.process(_samples(2))
    with pytest.raises(EngineDead):
        engine.generate([_prompt(0)], _images()[:1], params=PARAMS)
    engine.close()
    gone = [not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids]
    assert all(gone), pids
