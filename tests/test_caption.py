"""Caption engine on transformers with the tiny LLaVA-NeXT, and the caption stage."""

import dataclasses

import numpy as np
import pytest
import torch

from engine.core.config import ApiConfig, CaptionConfig, RuntimeConfig, SglangConfig
from engine.core.record import Sample, Source
from engine.evidence.prompt import fusion_prompt
from engine.stages.caption import CaptionStage, backend_settings
from models import tiny
from models.caption import transformers_backend
from models.caption.base import SamplingParams
from models.caption.registry import load_engine
from models.caption.transformers_backend import TransformersCaptionEngine
from models.errors import ConfigError
from models.records import OcrLine

SIZES = [(300, 100), (200, 480), (64, 64), (1000, 333), (129, 131)]  # (height, width)


@pytest.fixture(scope="module")
def tiny_root(tiny_cache):
    torch.set_num_threads(1)
    return tiny_cache


@pytest.fixture(scope="module")
def engine(tiny_root):
    folder = tiny.ensure("caption", tiny_root / "tiny")
    settings = backend_settings("transformers", CaptionConfig(), ApiConfig(), SglangConfig(), out="")
    engine = load_engine("transformers", "tiny", str(folder), "cpu", settings)
    yield engine
    engine.close()


def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def test_loads_from_saved_folder_through_production_path(engine):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    assert isinstance(engine.net, LlavaNextForConditionalGeneration)
    assert isinstance(engine.processor, LlavaNextProcessor)
    assert engine.net.dtype == torch.float32 and engine.backend == "transformers"
    assert engine.processor.tokenizer.padding_side == "left"
    assert engine.batch_size == CaptionConfig().caption_batch and engine.decode == "dynamic"


def test_batch_of_mixed_sizes_generates_one_caption_each(engine):
    prompts = [fusion_prompt(f"alt {i}", [], [OcrLine("HELLO", 0.9, (0, 0, 1, 1))] * i) for i in range(5)]
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12)
    captions = engine.generate(prompts, images(), params=params)
    assert len(captions) == 5
    for caption in captions:
        assert caption.finish_reason == "length" and caption.output_tokens == 12
        assert caption.model == "tiny" and caption.seconds > 0
    # AnyRes: the number of image tokens follows each image's size and aspect ratio
    assert len({c.prompt_tokens for c in captions}) > 1


def test_batched_equals_one_by_one_under_left_padding(engine):
    prompts = [fusion_prompt("short", [], []), fusion_prompt("a much longer alt text " * 8, [], [])]
    params = SamplingParams(max_new_tokens=8)
    batched = engine.generate(prompts, images()[:2], params=params)
    single = [engine.generate([p], [i], params=params)[0] for p, i in zip(prompts, images()[:2])]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in single]


def like(engine, **options) -> TransformersCaptionEngine:
    """Another engine around the same loaded model, with other batching or decoding options."""
    return TransformersCaptionEngine(engine.model, engine.processor, engine.net, "cpu", **options)


def mixed_prompts(n: int) -> list[str]:
    return [fusion_prompt(f"alt {i} " * (1 + 9 * (i % 2)), [], []) for i in range(n)]


def test_window_is_generated_shortest_first_and_answered_in_order(engine, monkeypatch):
    windowed = like(engine, batch_size=2)
    batches = []
    generate_batch = windowed._generate_batch

    def spy(prompts, images, params):
        captions = generate_batch(prompts, images, params)
        batches.append([c.prompt_tokens for c in captions])
        return captions

    monkeypatch.setattr(windowed, "_generate_batch", spy)
    prompts, params = mixed_prompts(5), SamplingParams(max_new_tokens=6)
    captions = windowed.generate(prompts, images(), params=params)
    single = [engine.generate([p], [i], params=params)[0] for p, i in zip(prompts, images())]
    assert [c.text for c in captions] == [c.text for c in single]
    assert [c.prompt_tokens for c in captions] == [c.prompt_tokens for c in single]
    # the estimate that orders the window is the processor's own count
    assert transformers_backend.prompt_lengths(engine.processor, prompts, images()) == [c.prompt_tokens for c in single]
    assert [len(b) for b in batches] == [2, 2, 1]
    assert all(max(a) <= min(b) for a, b in zip(batches, batches[1:]))


def test_sorting_the_window_cuts_padding(engine):
    prompts, params = mixed_prompts(4), SamplingParams(max_new_tokens=1)
    sizes = [(600, 600), (64, 64)] * 2  # long text with a small image and the reverse: interleaved
    pictures = [np.zeros((h, w, 3), np.uint8) for h, w in sizes]
    arrival, sorted_ = like(engine, batch_size=2), like(engine, batch_size=2)
    for i in range(0, 4, 2):  # arrival order: the stage hands over one batch at a time
        arrival.generate(prompts[i:i + 2], pictures[i:i + 2], params=params)
    sorted_.generate(prompts, pictures, params=params)
    assert sorted_.metrics()["padding_share"] < arrival.metrics()["padding_share"] / 2
    assert sorted_.metrics()["prompt_tokens"] < arrival.metrics()["prompt_tokens"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # compiled decoding steps of other tests must not count as recompiles
    yield
    torch._dynamo.reset()


def test_static_and_compiled_decoding_write_what_dynamic_writes(engine, fresh_dynamo):
    prompts, params = mixed_prompts(3), SamplingParams(max_new_tokens=8, min_new_tokens=8)
    expected = [c.text for c in like(engine, decode="dynamic").generate(prompts, images()[:3], params=params)]
    for decode in ("static", "compiled"):
        captions = like(engine, decode=decode).generate(prompts, images()[:3], params=params)
        assert [c.text for c in captions] == expected, decode
        assert all(c.finish_reason == "length" for c in captions)


def test_a_failing_compile_falls_back_to_the_static_cache(engine, fresh_dynamo, monkeypatch, caplog):
    from transformers import CompileConfig

    def broken_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    def broken(device):
        config = CompileConfig(backend=broken_compiler)
        config._compile_all_devices = True
        return config

    monkeypatch.setattr(transformers_backend, "compile_config", broken)
    compiled = like(engine, decode="compiled")
    prompts, params = mixed_prompts(2), SamplingParams(max_new_tokens=4, min_new_tokens=4)
    captions = compiled.generate(prompts, images()[:2], params=params)
    expected = engine.generate(prompts, images()[:2], params=params)
    assert [c.text for c in captions] == [c.text for c in expected]
    assert compiled.decode == "static" and compiled.metrics()["compile_fallbacks"] == 1
    assert "compiled decoding failed" in caplog.text


def test_an_input_failing_uncompiled_too_keeps_compiled_decoding(engine, monkeypatch):
    def generate(**kwargs):
        raise RuntimeError("the input is at fault")

    monkeypatch.setattr(engine.net, "generate", generate)
    compiled = like(engine, decode="compiled")
    captions = compiled.generate(mixed_prompts(2), images()[:2], params=SamplingParams(max_new_tokens=4))
    assert [c.finish_reason for c in captions] == ["error", "error"]
    assert "the input is at fault" in captions[0].text
    assert compiled.decode == "compiled" and compiled.metrics()["compile_fallbacks"] == 0


def test_auto_decoding_compiles_on_a_gpu_only():
    assert transformers_backend.resolve_decode("auto", "cuda:0") == "compiled"
    assert transformers_backend.resolve_decode("auto", "cpu") == "dynamic"
    assert transformers_backend.resolve_decode("static", "cuda") == "static"


def test_stop_reason_when_eos_comes(engine):
    # a random tiny model rarely emits EOS by itself: check the accounting on a given sequence
    eos = next(iter(engine.eos_ids))
    caption = engine._caption([5, 6, eos, engine.pad_id], prompt_tokens=10, seconds=0.1)
    assert caption.finish_reason == "stop" and caption.output_tokens == 2


def test_a_failing_input_fails_alone(engine):
    bad = np.zeros((0, 10, 3), np.uint8)  # an empty image the processor cannot take
    captions = engine.generate(["p1", "p2"], [images()[0], bad], params=SamplingParams(max_new_tokens=3))
    assert captions[0].finish_reason == "length"
    assert captions[1].finish_reason == "error" and captions[1].text


def make_sample(i: int, image: np.ndarray) -> Sample:
    sample = Sample(key=f"k{i}", source=Source("s", "s.tar", f"k{i}"), alt_text=f"alt {i}")
    sample.views["caption"] = image
    sample.prompt = fusion_prompt(sample.alt_text, [], [])
    return sample


def test_stage_captions_samples(tiny_root):
    runtime = RuntimeConfig(out="/tmp/unused", models="tiny", device="cpu", cache_dir=str(tiny_root))
    stage = CaptionStage(CaptionConfig(caption_batch=4, caption_sort_window=3, max_new_tokens=6), runtime)
    # the runtime hands over a window of batches, which the engine sorts by prompt length
    assert stage.views()[0].name == "caption" and stage.resources().batch_size == 12
    stage.setup()
    samples = [make_sample(i, img) for i, img in enumerate(images()[:3])]
    samples[1].prompt = ""
    stage.process(samples)
    stage.teardown()
    assert samples[0].caption.output_tokens <= 6 and samples[2].caption is not None
    assert samples[1].status == "error" and "prompt stage" in samples[1].reason
    assert samples[0].annotations()["engine"]["backend"] == "transformers"


def test_missing_model_folder_is_a_config_error():
    runtime = RuntimeConfig(out="/tmp/unused", device="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        CaptionStage(CaptionConfig(caption_model="/nowhere/llava"), runtime)


@pytest.mark.parametrize(
    "bad",
    [{"caption_backend": "nope"}, {"max_new_tokens": 0}, {"min_new_tokens": 500}, {"top_p": 0.0},
     {"caption_sort_window": 0}],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        dataclasses.replace(CaptionConfig(), **bad).validate()
