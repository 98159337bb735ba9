"""Exactly-once resume: SIGKILL at several points, rerun, compare with one clean run."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import encode, sample_members, write_tar
from contract import check_output_contract
from PIL import Image

from engine.io.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent


def make_shards(folder: Path, n_shards: int = 6, per_shard: int = 60) -> list[Path]:
    folder.mkdir()
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            size = (900, 700) if i % 7 else (300, 200)  # every 7th is filtered
            image = encode(Image.new("RGB", size, (s * 40 % 255, i * 4 % 255, 90)), "JPEG")
            members += sample_members(f"{s:02d}{i:04d}", image, f"alt {s} {i}")
        paths.append(write_tar(folder / f"shard-{s:02d}.tar", members))
    return paths


def command(shards: list[Path], out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "densefusion_local.py"), "run", "--shards", *map(str, shards),
            "--out", str(out), "--no-progress", "--decode-batch", "8", "--decode-threads", "1",
            "--stages", "decode"]  # the foundation's stages: no model-backed stage needed


def finished(out: Path) -> int:
    try:
        return len(read_manifest(out))
    except (OSError, ValueError):
        return 0


@contextmanager
def held_back(shard: Path) -> Iterator[None]:
    """The shard is a named pipe nobody writes while the block runs: a run waits for it however
    fast the machine gets through the others, so a kill lands with it unfinished. Then the real
    file is back for the rerun."""
    data = shard.read_bytes()
    shard.unlink()
    os.mkfifo(shard)
    try:
        yield
    finally:
        shard.unlink()
        shard.write_bytes(data)


def run_and_kill(cmd: list[str], out: Path, *, after_shards: int | None = None, after_s: float = 0.0) -> int:
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if after_shards is None and time.monotonic() > deadline - 120 + after_s:
            break
        if after_shards is not None and finished(out) >= after_shards:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return finished(out)


def contents(out: Path, shards: list[Path]) -> dict:
    results = check_output_contract(out, shards)
    return {shard: (sorted((r["key"], r["alt_text"], r["width"]) for r in written),
                    sorted((r["key"], r["reason"]) for r in rejected))
            for shard, (written, rejected) in results.items()}


def test_sigkill_at_several_points_then_resume_equals_a_clean_run(tmp_path):
    shards = make_shards(tmp_path / "in")
    clean = tmp_path / "clean"
    subprocess.run(command(shards, clean), cwd=ROOT, check=True, capture_output=True)

    resumed = tmp_path / "resumed"
    cmd = command(shards, resumed)
    run_and_kill(cmd, resumed, after_s=0.3)  # while loading, before any shard commits
    run_and_kill(cmd, resumed, after_shards=1)  # right after the first commit
    with held_back(shards[-1]):
        assert run_and_kill(cmd, resumed, after_shards=3) < len(shards)  # mid-run: work was left undone
    final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert finished(resumed) == len(shards)
    assert not list((resumed / "shards").glob("*.tmp")) and not list((resumed / "rejects").glob("*.tmp"))
    assert contents(resumed, shards) == contents(clean, shards)
    assert "already done" in final.stdout


def test_rerun_of_a_finished_output_skips_everything(tmp_path):
    shards = make_shards(tmp_path / "in", n_shards=2, per_shard=5)
    out = tmp_path / "out"
    subprocess.run(command(shards, out), cwd=ROOT, check=True, capture_output=True)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = subprocess.run(command(shards, out), cwd=ROOT, check=True, capture_output=True, text=True)
    assert "0 committed this run, 2 already done" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before


def test_sigint_commits_finished_shards_and_exits_cleanly(tmp_path):
    shards = make_shards(tmp_path / "in", n_shards=6, per_shard=60)
    out = tmp_path / "out"
    process = subprocess.Popen(command(shards, out), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while finished(out) < 1 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGINT)
    stdout, _ = process.communicate(timeout=120)
    done = finished(out)
    assert process.returncode in (0, 130)
    # queued work may still finish after Ctrl-C; either way the exit code tells the truth
    if process.returncode == 130:
        assert "interrupted" in stdout and 1 <= done < len(shards)
    else:
        assert done == len(shards)
    check_output_contract(out, [p for p in shards if (out / "shards" / f"{p.stem}.parquet").exists()
                                and p.stem in read_manifest(out)])
    assert not list((out / "shards").glob("*.tmp"))
