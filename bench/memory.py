"""Peak memory (RSS) of a run as a shard holds more near-cap members, against the same run with
fewer of them (flat under the byte budget) and, with ``--repo``, against another checkout's code.

Writes gzipped tars of zero-filled ``.jpg`` members just under ``--max-member-bytes`` (127 MiB
by default: a few hundred KB each once compressed), then runs ``densefusion_local.py run
--stages probe`` on each in a child process and prints the child's peak RSS. The probe rejects
every member (not an image), so what grows with the member count is only what the run holds of
the shard. With the byte budget (``--max-bytes-in-flight``) the peak stops growing once the
members in flight fill it; ``--repo`` runs another checkout's code (e.g. one without the budget)
on the same shards, for a before/after figure.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from engine.io.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20

# The child reports its own peak RSS (getrusage's children figure is a maximum over every child waited for).
_CHILD = ("import resource, sys, densefusion_local; code = densefusion_local.main(sys.argv[1:]); "
          "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")


class _Zeros:
    """A file of ``size`` zero bytes, read in chunks (a member is never whole in this process)."""

    def __init__(self, size: int):
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def write_zero_shard(path: Path, members: int, member_bytes: int) -> Path:
    """A gzipped tar of ``members`` zero-filled ``<i>.jpg`` members of ``member_bytes`` each."""
    with gzip.open(path, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for i in range(members):
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = member_bytes
            tar.addfile(info, _Zeros(member_bytes))
    return path


def peak_rss(shard: Path, out: Path, *, repo: Path = ROOT, budget: int | None = None) -> int:
    """Peak RSS (bytes) of ``run --stages probe`` over ``shard`` with ``repo``'s code."""
    argv = ["run", "--shards", str(shard), "--out", str(out), "--stages", "probe", "--no-progress",
            "--device", "cpu"]
    if budget is not None:
        argv += ["--max-bytes-in-flight", str(budget)]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", _CHILD, *argv], cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("peak_rss_kib "))
    return int(line.split()[1]) * 1024


def measure(counts: tuple[int, ...], member_bytes: int, *, repo: Path = ROOT, budget: int | None = None) -> dict[int, int]:
    """Member count → peak RSS (bytes); every member must end in rejects/ (the probe's verdict)."""
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for count in counts:
            shard = write_zero_shard(Path(tmp) / f"zeros{count}.tar.gz", count, member_bytes)
            out = Path(tmp) / f"out{count}"
            peaks[count] = peak_rss(shard, out, repo=repo, budget=budget)
            entry = read_manifest(out)[f"zeros{count}"]  # the old manifest.json too (--repo)
            if entry["rejected"] != count:
                raise RuntimeError(f"{count} members: {entry['rejected']} rejected, expected all")
            shard.unlink()
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[6, 12], help="member counts, one shard each")
    parser.add_argument("--member-mib", type=float, default=127.0, help="size of each zero-filled member")
    parser.add_argument("--budget-mib", type=float, default=None,
                        help="--max-bytes-in-flight in MiB (default: the run's default)")
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose code runs (default: this one)")
    args = parser.parse_args(argv)

    member_bytes = int(args.member_mib * MIB)
    budget = None if args.budget_mib is None else int(args.budget_mib * MIB)
    peaks = measure(tuple(args.members), member_bytes, repo=args.repo, budget=budget)
    print(f"{args.repo}: run --stages probe, zero-filled members of {args.member_mib:g} MiB, "
          f"max bytes in flight: {'default' if budget is None else f'{args.budget_mib:g} MiB'}")
    first = min(peaks)
    for count, peak in sorted(peaks.items()):
        growth = f"  {(peak - peaks[first]) / 1e6 / (count - first):+,.0f} MB per member over {first}" if count > first else ""
        print(f"  {count:>4} members  peak RSS {peak / 1e9:6.2f} GB{growth}")
    return 0
