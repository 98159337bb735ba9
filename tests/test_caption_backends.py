"""Backend selection and the caption stage on the non-transformers backends."""

import logging

import numpy as np
import pytest

from bench._chat_server import ChatServer
from engine.core.config import ApiConfig, CaptionConfig, RuntimeConfig
from engine.core.record import Sample, ShardEnd, Source
from engine.stages.caption import CaptionStage
from models.caption.registry import resolve_backend
from models.errors import ConfigError


def _no_sglang(monkeypatch):
    monkeypatch.setattr("models.caption.sglang_backend.sglang_available", lambda: False)


def test_auto_falls_back_to_transformers_and_says_so(monkeypatch, caplog):
    _no_sglang(monkeypatch)
    assert resolve_backend("auto", "cpu") == "transformers"
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("auto", "cuda") == "transformers"
    assert "SGLang is not installed" in caplog.text
    monkeypatch.setattr("models.caption.sglang_backend.sglang_available", lambda: True)
    assert resolve_backend("auto", "cuda:1") == "sglang"
    assert resolve_backend("auto", "cpu") == "transformers"  # SGLang needs a GPU


def test_explicit_sglang_without_sglang_fails_before_any_work(monkeypatch, tmp_path):
    _no_sglang(monkeypatch)
    runtime = RuntimeConfig(out=str(tmp_path), device="cpu", models="tiny")
    with pytest.raises(ConfigError, match="SGLang is not installed"):
        CaptionStage(CaptionConfig(caption_backend="sglang"), runtime)


def test_openai_without_an_endpoint_fails_before_any_work(tmp_path):
    runtime = RuntimeConfig(out=str(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match="--api-base"):
        CaptionStage(CaptionConfig(caption_backend="openai"), runtime)


def _samples(n: int) -> list[Sample]:
    samples = []
    for i in range(n):
        s = Sample(key=f"k{i}", source=Source(shard="s", path="p", member=f"k{i}.jpg"))
        s.prompt = f"prompt {i}"
        s.views["caption"] = np.full((40, 60, 3), i, dtype=np.uint8)
        samples.append(s)
    return samples


def test_caption_stage_on_the_openai_backend(tmp_path):
    runtime = RuntimeConfig(out=str(tmp_path), device="cpu", models="tiny")
    scripts = {"prompt 1": ["429:0"], "prompt 2": ["400"]}
    with ChatServer(scripts) as server:
        api = ApiConfig(api_base=server.url, api_model="fake-4v", api_concurrency=4,
                        api_backoff=0.01)
        stage = CaptionStage(CaptionConfig(caption_backend="openai", caption_batch=2), runtime, api=api)
        assert stage.resources().batch_size == 4  # at least the request window
        assert stage.resources().workers == 2  # the next batch tops up the window
        stage.setup()
        batch = stage.process(_samples(5))
        stage.teardown()
    assert [s.status for s in batch] == ["ok", "ok", "error", "ok", "ok"]
    assert batch[1].caption.text == server.caption_for("prompt 1")
    assert batch[0].caption.backend == "openai" and batch[0].caption.model == "fake-4v"
    assert batch[2].stage == "caption" and "HTTP 400" in batch[2].reason
    figures = stage.metrics()
    assert figures["api_requests"] == 6 and figures["api_retries"] == 1
    assert figures["finish_stop"] == 4 and figures["finish_error"] == 1
    assert figures["images_per_s"] > 0 and figures["output_tokens_per_s"] > 0
    assert "fake-4v" in stage.describe()


def test_the_next_batch_fills_the_window_while_a_slow_request_finishes(tmp_path):
    """Through the runtime: a batch whose one request is slow does not hold back the next."""
    from engine.core.runtime import Pipeline

    class Writer:
        def __init__(self):
            self.keys = []

        def write(self, sample):
            self.keys.append((sample.key, sample.status))

        def commit(self, end):
            self.keys.append(("commit", end.shard))

    runtime = RuntimeConfig(out=str(tmp_path), device="cpu", models="tiny")
    with ChatServer({"prompt 0": ["slow:2"]}) as server:
        api = ApiConfig(api_base=server.url, api_model="m", api_concurrency=2)
        stage = CaptionStage(CaptionConfig(caption_backend="openai", caption_batch=1), runtime, api=api)
        writer = Writer()
        items = [*_samples(6), ShardEnd("s", "p", 6)]
        Pipeline([stage], queue_depth=4).run(iter(items), writer)
    # batches of 2: [k0 (slow), k1], [k2, k3], ...; k2 was asked for while k0 was still running
    assert server.attempts["prompt 2"][0][0] < server.finished["prompt 0"]
    assert writer.keys[-1] == ("commit", "s") and sorted(writer.keys[:-1]) == [(f"k{i}", "ok") for i in range(6)]
    assert stage.metrics()["api_requests"] == 6
