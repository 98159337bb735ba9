"""The whole run on SGLang on the CPU, as the README tells a CPU user to start it: killed with
SIGKILL with shards left, then rerun. Every key lands exactly once, and no SGLang
process outlives either run (checked by PID)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import encode, sample_members, write_tar
from contract import check_output_contract
from PIL import Image
from test_resume import held_back

from engine.io.manifest import read_manifest
from models.caption.sglang_backend import sglang_available

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.skipif(not sglang_available(), reason="the sglang extra is not installed"),
              pytest.mark.slow]  # starts SGLang's CPU engine: left out by the quick test command (README)


def make_shards(folder: Path, n_shards: int = 4, per_shard: int = 3) -> list[Path]:
    folder.mkdir()
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            size = ((700, 480), (480, 900), (560, 560))[i]  # three AnyRes grids
            image = encode(Image.new("RGB", size, (s * 60 % 255, i * 80 % 255, 90)), "JPEG")
            members += sample_members(f"{s:02d}{i:03d}", image, f"a shop front, photo {s} {i}")
        paths.append(write_tar(folder / f"shard-{s:02d}.tar", members))
    return paths


def finished(out: Path) -> int:
    try:
        return len(read_manifest(out))
    except (OSError, ValueError):
        return 0


def run_watching(cmd: list[str], *, kill_after_shards: int | None = None) -> tuple[int, set[int], str]:
    """Run ``cmd``, noting every process it starts; SIGKILL it once that many shards are committed."""
    import psutil

    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, children = psutil.Process(process.pid), set()
    deadline = time.monotonic() + 600
    out = Path(cmd[cmd.index("--out") + 1])
    while process.poll() is None and time.monotonic() < deadline:
        try:
            children |= {p.pid for p in parent.children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        if kill_after_shards is not None and finished(out) >= kill_after_shards:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    output = process.communicate()[0]
    assert children, output  # SGLang's scheduler and detokenizer were seen
    return process.returncode, children, output


def alive(pids: set[int], wait_s: float = 30.0) -> list[int]:
    """The ones still running after ``wait_s`` (zombies count as gone: they hold nothing)."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        running = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    running.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def test_sigkill_mid_caption_then_rerun_writes_every_key_once_and_leaves_no_process(tmp_path, tiny_cache):
    shards = make_shards(tmp_path / "in")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "densefusion_local.py"), "run", "--shards", *map(str, shards),
           "--out", str(out), "--models", "tiny", "--caption-backend", "sglang", "--device", "cpu",
           "--no-progress", "--cache-dir", str(tiny_cache), "--max-new-tokens", "8",
           # one request at a time, so each after the first finds the chat text's head in the radix cache
           "--sglang-window", "1", "--caption-batch", "1"]
    with held_back(shards[-1]):  # the kill after the first commit lands with shards left
        code, children, output = run_watching(cmd, kill_after_shards=1)
    assert code == -signal.SIGKILL, output
    assert 1 <= finished(out) < len(shards)
    assert not alive(children), "SGLang processes outlived the killed run"
    code, children, output = run_watching(cmd)
    assert code == 0, output
    assert not alive(children), "SGLang processes outlived the run"
    assert finished(out) == len(shards) and "already done" in output
    results = check_output_contract(out, shards)
    assert sum(len(written) for written, _ in results.values()) > 0

    caption = next(s for s in json.loads((out / "metrics.json").read_text())["stages"] if s["stage"] == "caption")
    from transformers import AutoProcessor

    from models import tiny
    from models.caption.chat import chat_text

    processor = AutoProcessor.from_pretrained(tiny.ensure("caption", tiny_cache / "tiny"))
    head = chat_text(processor, "").split(processor.image_token)[0]  # what comes before the image
    # the requests after the first share it (SGLang may recompute its last token)
    assert caption["cached_tokens"] >= len(processor.tokenizer(head)["input_ids"]) - 1 > 0
    assert caption["prefix_cache_hit_rate"] == pytest.approx(caption["cached_tokens"] / caption["prompt_tokens"])
    assert f"prefix hit {caption['prefix_cache_hit_rate']:.0%}" in output  # the summary says it too
