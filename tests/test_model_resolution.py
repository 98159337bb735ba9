"""Every model a run will load is resolved before any work, through the CLI: with the hub offline
or unreachable, a run fails in seconds (not after minutes of retries), lists every problem at once,
exits 2 and writes nothing."""

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import jpeg, sample_members, write_tar

from models.hub import hub_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND_S = 90  # generous (imports of torch and open_clip on a loaded 2-core machine); it took 152 s, then a traceback


def closed_port() -> int:
    """A local port nobody listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_env(tmp_path, offline: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty hub cache
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    return env


@pytest.mark.parametrize("offline, flags, expected", [
    (False, ["--tagger", "clip", "--tag-vocab", "{vocab}"],
     ["embedding weights 'merged2b_s4b_b131k' of EVA02-L-14", "OWLv2 model 'google/owlv2-base-patch16-ensemble'",
      "caption model 'llava-hf/llava-v1.6-vicuna-7b-hf'", "cannot be reached"]),
    (True, [],  # the default tagger: its missing checkpoint is one more problem of the same list
     ["--tagger ram_plus (the default) needs --ram-plus-model", "--tagger clip --tag-vocab FILE",
      "embedding weights 'merged2b_s4b_b131k' of EVA02-L-14", "OWLv2 model", "caption model",
      "HF_HUB_OFFLINE is set"]),
    (True, ["--curate", "--embed-model", "tiny", "--tagger", "clip", "--tag-vocab", "{vocab}"],  # pass 1 could run
     ["OWLv2 model 'google/owlv2-base-patch16-ensemble'", "caption model 'llava-hf/llava-v1.6-vicuna-7b-hf'"]),
])
def test_a_model_that_cannot_be_fetched_fails_before_any_work(tmp_path, tiny_cache, offline, flags, expected):
    shard = write_tar(tmp_path / "in.tar", sample_members("k", jpeg(500, 500)))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("dog\ncat\n")
    out = tmp_path / "out"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "densefusion_local.py", "run", "--shards", str(shard), "--out", str(out), "--no-progress",
         "--cache-dir", str(tiny_cache), *(f.format(vocab=vocab) for f in flags)],
        cwd=ROOT, env=hub_env(tmp_path, offline), capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert elapsed < BOUND_S, f"took {elapsed:.0f}s"
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "problems, fix them all" in result.stderr
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr
    assert not out.exists()  # nothing written, not even metrics.json saying "running"


def test_a_cached_model_resolves_offline(tmp_path, monkeypatch):
    """The local hub cache is enough: a repository whose file is there passes with the hub off."""
    snapshot = tmp_path / "models--org--model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("abc")
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    assert hub_problem("org/model", "caption model") is None
    assert "HF_HUB_OFFLINE is set" in hub_problem("org/other", "caption model")
