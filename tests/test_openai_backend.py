import logging
import sys

import numpy as np
import pytest

from bench._chat_server import ChatServer
from engine.core.config import ApiConfig, CaptionConfig, SglangConfig
from engine.stages.caption import backend_settings
from models.caption.base import SamplingParams
from models.caption.openai_backend import (
    OpenAIEngine,
    backoff_seconds,
    chat_request,
    parse_completion,
    retry_after_seconds,
)
from models.errors import ConfigError

SECRET = "sk-test-not-a-real-key-8c1f"


def api_settings(**options):
    """The backend's settings as the caption stage builds them from ``--api-*`` options."""
    cfg = ApiConfig(**options)
    cfg.validate()
    return backend_settings("openai", CaptionConfig(), cfg, SglangConfig(), out="")


def _engine(url: str, **changes) -> OpenAIEngine:
    settings = {"api_base": url, "api_model": "fake-4v", "api_concurrency": 4, "api_max_retries": 3,
                    "api_timeout": 0.5, "api_backoff": 0.01, "api_max_backoff": 2.0}
    settings.update(changes)
    return OpenAIEngine(api_settings(**settings))


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_every_sample_ends_with_one_caption_or_one_error(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    scripts = {
        "p-429": ["429:0.3"],
        "p-500": ["500", "500"],
        "p-timeout": ["timeout:1.0"],
        "p-malformed": ["malformed"],
        "p-reset": ["reset"],
        "p-mixed": ["429:0", "malformed", "500"],
        "p-400": ["400"],  # a client error is not retried
        "p-hopeless": ["500"] * 10,  # more failures than retries
    }
    prompts = [f"p-ok-{i}" for i in range(6)] + list(scripts)
    caplog.set_level(logging.DEBUG)
    with ChatServer(scripts, expect_key=SECRET) as server:
        engine = _engine(server.url)
        captions = engine.generate(prompts, _images(len(prompts)), params=SamplingParams(64))
        engine.close()

    assert len(captions) == len(prompts)
    by_prompt = dict(zip(prompts, captions))
    for prompt in prompts:
        caption = by_prompt[prompt]
        if prompt in ("p-400", "p-hopeless"):
            assert caption.finish_reason == "error", prompt
            assert server.answered[prompt] == 0
        else:
            assert caption.finish_reason == "stop", (prompt, caption.text)
            assert caption.text == server.caption_for(prompt)
            assert caption.output_tokens == server.output_words
            assert server.answered[prompt] == 1, prompt  # answered exactly once
    assert len(server.attempts["p-400"]) == 1
    assert len(server.attempts["p-hopeless"]) == 4  # 1 try + 3 retries
    assert "after 4 attempt(s)" in by_prompt["p-hopeless"].text
    assert len(server.attempts["p-mixed"]) == 4
    # Retry-After: 0.3 s is honoured although the backoff alone would wait ~0.01 s.
    (first, _), (second, _) = server.attempts["p-429"]
    assert second - first >= 0.3
    # The key is sent, and written nowhere.
    assert server.auth_headers == {f"Bearer {SECRET}"}
    everything = caplog.text + "".join(c.text for c in captions) + repr(engine.metrics())
    assert SECRET not in everything
    assert engine.metrics()["api_errors"] == 2.0


def test_requests_in_flight_stay_within_the_window(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ChatServer(latency=0.05) as server:
        engine = _engine(server.url, api_concurrency=3)
        prompts = [f"p{i}" for i in range(12)]
        captions = engine.generate(prompts, _images(12), params=SamplingParams())
        engine.close()
    assert [c.finish_reason for c in captions] == ["stop"] * 12
    assert 2 <= server.max_in_flight <= 3
    assert server.auth_headers == {""}  # no key in the environment: no Authorization header


def test_unreachable_endpoint_is_a_per_sample_error():
    engine = _engine("http://127.0.0.1:9/v1", api_max_retries=1)  # discard port: refused
    captions = engine.generate(["a", "b"], _images(2), params=SamplingParams())
    engine.close()
    assert [c.finish_reason for c in captions] == ["error", "error"]
    assert all("after 2 attempt(s)" in c.text for c in captions)


def test_request_body_has_prompt_then_image_and_sampling_params():
    body = chat_request("m", "describe", "data:image/jpeg;base64,xx",
                        SamplingParams(max_new_tokens=300, temperature=0.2, top_p=0.9), "high")
    content = body["messages"][0]["content"]
    assert [part["type"] for part in content] == ["text", "image_url"]
    assert content[0]["text"] == "describe"
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (300, 0.2, 0.9)
    assert "min_tokens" not in body  # OpenAI itself rejects unknown parameters
    fixed = chat_request("m", "d", "u", SamplingParams(max_new_tokens=8, min_new_tokens=8), "low")
    assert fixed["min_tokens"] == 8


def test_response_parsing():
    ok = parse_completion(b'{"choices":[{"message":{"content":"A cat."},"finish_reason":"length"}],'
                          b'"usage":{"prompt_tokens":5,"completion_tokens":3}}')
    assert (ok.text, ok.prompt_tokens, ok.output_tokens, ok.finish_reason) == ("A cat.", 5, 3, "length")
    for bad in (b"", b"{", b'{"choices":[]}', b'{"choices":[{"message":{"content":null}}]}'):
        with pytest.raises(ValueError):
            parse_completion(bad)


def test_retry_after_and_backoff():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after_seconds("soon") is None
    import random

    rng = random.Random(0)
    waits = [backoff_seconds(a, 1.0, 10.0, rng) for a in range(6)]
    assert 0.5 <= waits[0] <= 1.0 and 4.0 <= waits[3] <= 8.0
    assert all(5.0 <= w <= 10.0 for w in waits[4:])  # capped


def test_configuration_is_checked_before_any_work():
    with pytest.raises(ConfigError):
        OpenAIEngine(api_settings())  # no endpoint
    with pytest.raises(ConfigError):
        ApiConfig(api_base="localhost:8000").validate()
    with pytest.raises(ConfigError):
        ApiConfig(api_concurrency=0).validate()


def test_killed_then_resumed_cli_run_captions_every_sample_exactly_once(tmp_path, monkeypatch):
    """Through the CLI, against a flaky server: SIGKILL mid-run, rerun, compare with a clean run."""
    import subprocess

    from contract import check_output_contract
    from test_resume import ROOT, held_back, make_shards, run_and_kill

    shards = make_shards(tmp_path / "in", n_shards=4, per_shard=8)
    chaos = ("429:0.05", "ok", "500", "ok", "malformed", "timeout:1.5", "reset", "ok")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # the runs below inherit it

    def command(out, server):
        return [sys.executable, str(ROOT / "densefusion_local.py"), "run", "--shards", *map(str, shards),
                "--out", str(out), "--no-progress", "--stages", "decode", "prompt", "caption", "qc",
                "--caption-backend", "openai", "--api-base", server.url, "--api-model", "fake-4v",
                "--api-concurrency", "4", "--api-timeout", "0.5", "--api-backoff", "0.01",
                "--caption-max-side", "256", "--decode-threads", "1", "--device", "cpu"]

    with ChatServer(latency=0.05, output_words=30, expect_key=SECRET, chaos=chaos) as server:
        clean = subprocess.run(command(tmp_path / "clean", server), cwd=ROOT, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    resumed = tmp_path / "resumed"
    with ChatServer(latency=0.05, output_words=30, expect_key=SECRET, chaos=chaos) as server:
        with held_back(shards[-1]):
            assert run_and_kill(command(resumed, server), resumed, after_shards=1) < len(shards)
        final = subprocess.run(command(resumed, server), cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    # The rerun took what the killed run had been answered from its journal: only the requests
    # in flight at the kill (at most --api-concurrency) were paid for twice.
    assert sum(n > 1 for n in server.answered.values()) <= 4
    assert (resumed / "journal" / "openai.jsonl").is_file()

    results = {}
    for out in (tmp_path / "clean", resumed):
        contract = check_output_contract(out, shards)  # every key written xor rejected, once
        results[out.name] = {shard: (sorted((r["key"], r["caption"]) for r in written),
                                     sorted((r["key"], r["stage"]) for r in rejected))
                             for shard, (written, rejected) in contract.items()}
        for written, rejected in contract.values():
            assert all(r["caption"] == server.caption_for(r["prompt"]) for r in written)
            assert {r["stage"] for r in rejected} <= {"probe"}  # only the too-small images
    assert results["resumed"] == results["clean"]
    assert any(action != "ok" for attempts in server.attempts.values() for _, action in attempts)
    # The key went out in every request and was written nowhere.
    assert server.auth_headers == {f"Bearer {SECRET}"}
    for path in [*(tmp_path / "clean").rglob("*"), *resumed.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in clean.stdout + clean.stderr + final.stdout + final.stderr


def test_a_rerun_takes_finished_captions_from_the_journal(tmp_path):
    from models.caption.journal import CaptionJournal

    prompts, images = ["a", "b", "c"], _images(3)
    with ChatServer({"c": ["400"]}) as server:
        first = OpenAIEngine(api_settings(api_base=server.url, api_model="m"), CaptionJournal(tmp_path / "j.jsonl"))
        before = first.generate(prompts, images, params=SamplingParams(32))
        first.close()
        with open(tmp_path / "j.jsonl", "a") as journal:
            journal.write('{"id": "cut sho')  # a line cut by a kill
        again = OpenAIEngine(api_settings(api_base=server.url, api_model="m"), CaptionJournal(tmp_path / "j.jsonl"))
        after = again.generate(prompts, images, params=SamplingParams(32))
        other_params = again.generate(prompts[:1], images[:1], params=SamplingParams(16))
        again.close()
    assert after[:2] == before[:2]  # the same captions, not asked again
    assert {p: len(a) for p, a in server.attempts.items()} == {"a": 2, "b": 1, "c": 2}  # "a" again for 16 tokens
    assert before[2].finish_reason == "error" and after[2].finish_reason == "stop"  # errors are not kept
    assert again.metrics()["api_from_journal"] == 2 and other_params[0].finish_reason == "stop"
    assert len(CaptionJournal(tmp_path / "j.jsonl")) == 4
