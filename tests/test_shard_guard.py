"""No shard can stop the run, and none costs unbounded memory (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import jpeg, sample_members, write_tar
from contract import check_output_contract
from tar_corpus import END, Archive, gz, gzip_of_zeros, header

import densefusion_local
import engine.io.readers as readers
from engine.io.manifest import read_manifest


def run(shards: list[Path], out: Path) -> int:
    return densefusion_local.main(["run", "--shards", *map(str, shards), "--out", str(out), "--no-progress",
                                   "--stages", "probe", "--min-short-edge", "0"])


def good_tar(path: Path, n: int = 3) -> Path:
    return write_tar(path, [m for i in range(n) for m in sample_members(f"{path.stem}-{i}", jpeg(40, 30))])


def test_one_poisoned_shard_among_good_ones_commits_every_shard_and_the_rerun_is_a_no_op(tmp_path, monkeypatch):
    shards = [good_tar(tmp_path / "a.tar"), tmp_path / "corrupt.parquet", good_tar(tmp_path / "b.tar"),
              good_tar(tmp_path / "poison.tar", 6), good_tar(tmp_path / "c.tar")]
    shards[1].write_bytes(b"PAR1 this is not a parquet file PAR1")

    class RaisesMidShard(readers.TarReader):  # a reader bug: raises after a few members of one shard
        def __iter__(self):
            for i, member in enumerate(super().__iter__()):
                if i == 7 and member.name.startswith(b"poison"):
                    raise RecursionError("maximum recursion depth exceeded")
                yield member

    monkeypatch.setattr(readers, "TarReader", RaisesMidShard)
    out = tmp_path / "out"
    code = run(shards, out)
    manifest = read_manifest(out)
    assert set(manifest) == {"a", "corrupt", "b", "poison", "c"}
    good = [s for s in shards if s.stem in "abc"]
    check_output_contract(out, good)
    assert all(not manifest[s.stem]["errors"] and manifest[s.stem]["written"] == 3 for s in good)
    assert "ArrowInvalid" in manifest["corrupt"]["errors"][0] and manifest["corrupt"]["samples"] == 0
    poison = manifest["poison"]
    assert "RecursionError" in poison["errors"][0] and "after 2 samples" in poison["errors"][0]
    assert poison["written"] + poison["rejected"] == poison["samples"] == 2

    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "metrics.json")
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert run(shards, out) == code
    assert read_manifest(out) == manifest
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing redone, nothing rewritten


def test_gigabyte_member_in_a_megabyte_targz_stays_under_a_gigabyte_for_the_whole_run(tmp_path):
    tail = Archive().sample("after", jpeg(40, 30)).data + END
    data = gz(header(b"big.jpg", 1 << 30)) + gzip_of_zeros(1024) + gz(tail)
    assert len(data) < 2 << 20
    shard = tmp_path / "bomb.tar.gz"
    shard.write_bytes(data)
    out = tmp_path / "out"
    # the peak of the run's own process: VmHWM belongs to the memory map exec made; ru_maxrss
    # would also hold pytest's size (Linux carries it over from the forked parent across exec)
    script = ("import re, sys, densefusion_local\n"
              f"code = densefusion_local.main(['run', '--shards', {str(shard)!r}, '--out', {str(out)!r}, "
              "'--no-progress', '--stages', 'probe', '--min-short-edge', '0'])\n"
              "print('peak_kib', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
              "sys.exit(code)\n")
    # without what an in-process CPU SGLang test left in this process's environment (its placeholder
    # ops' sitecustomize on PYTHONPATH imports torch into every interpreter started after it)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SGLANG_USE_CPU_ENGINE")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    peak_kib = int(done.stdout.split("peak_kib")[1].split()[0])
    assert peak_kib < 1 << 20, f"peak RSS {peak_kib / 1024:.0f} MiB"
    written, rejected = check_output_contract(out, [shard])["bomb"]
    assert [r["key"] for r in written] == ["after"]
    assert [r["key"] for r in rejected] == ["big"] and "--max-member-bytes" in rejected[0]["reason"]
