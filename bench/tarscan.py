"""How fast the tar reader passes over data it does not keep and searches after damage (MiB/s),
over hostile content full of ``ustar`` against zeros in the same run.

One big member of each kind of content, read by ``engine.io.tar.TarReader`` as a run reads a
shard (chunks from a file object):

  skip     a member the caller does not keep (over the cap, unused): passed over by its size
           field, block boundaries looked at
  resync   the same bytes after a damaged header: searched at every offset for the next one

Content: zeros (the baseline, in the same run); ``ustar000`` repeated (the magic every 8 bytes:
issue 21's 300 MiB member); the magic then 19 digits (the first field tests pass);
near-headers (a whole header with a wrong checksum in every block). Prints MiB/s of CPU time
(one core; best of ``--repeat``: the machines are shared) and each as a share of zeros'.
The goal: 200 MiB/s or more whatever the content.
"""

from __future__ import annotations

import argparse
import io
import time

from engine.io.tar import BLOCK, TarReader


def near_header() -> bytes:
    """A ustar header block for ``near.jpg`` whose checksum field is off by one."""
    block = bytearray(BLOCK)
    block[0:8] = b"near.jpg"
    block[124:136] = b"00000000000\0"
    block[156:157] = b"0"
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % (sum(block) + 1)
    return bytes(block)


CONTENT = {
    "zeros": bytes(BLOCK),
    "ustar000 repeated": b"ustar000",
    "ustar + 19 digits": b"ustar" + b"0" * 19,
    "near-headers": near_header(),
}


def end_header(name: bytes, size: int, checksum_delta: int = 0) -> bytes:
    block = bytearray(near_header())
    block[0:100] = name.ljust(100, b"\0")
    block[124:136] = b"%011o\0" % size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % (sum(block) + checksum_delta)
    return bytes(block)


def best_seconds(data: bytes, read, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        stream = io.BytesIO(data)
        start = time.process_time()
        read(stream)
        best = min(best, time.process_time() - start)
    return best


def tar_read(stream) -> None:
    members = list(TarReader(stream, lambda name, size: 0))
    assert members[-1].name == b"after.jpg", "the member after the data was not found"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench tarscan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="size of the member passed over")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best (least CPU time) is printed")
    args = parser.parse_args(argv)
    size = args.mib << 20
    after = end_header(b"after.jpg", 1) + b"x".ljust(BLOCK, b"\0") + bytes(2 * BLOCK)
    print(f"{args.mib} MiB member; MiB/s of CPU time, best of {args.repeat} (share of zeros')")
    print(f"  {'content':<20} {'skip':>20} {'resync':>20}")
    zeros: tuple[float, float] | None = None
    for name, unit in CONTENT.items():
        data = (unit * (size // len(unit) + 1))[:size]
        skipped = end_header(b"big.bin", size) + data + after
        damaged = end_header(b"lost.bin", size, checksum_delta=1) + data + after
        rates = (size / best_seconds(skipped, tar_read, args.repeat) / 2**20,
                 size / best_seconds(damaged, tar_read, args.repeat) / 2**20)
        zeros = zeros or rates
        print(f"  {name:<20}" + "".join(f" {rate:>12,.0f} ({rate / base:5.0%})" for rate, base in zip(rates, zeros)))
    return 0
