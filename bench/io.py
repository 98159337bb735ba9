"""Reading, header probe and decode (images/s) against decode-then-check and PIL decode + resize.

Writes a tar of 1–2 MP photo-like JPEGs, then measures in the same run:
  baseline check   read + PIL full decode, then check the size (what ad-hoc scripts do)
  header probe     read + the engine's header-only probe (the resolution filter)
  baseline decode  read + PIL full decode + resize to the embedder's 448 px
  engine decode    read + probe + the engine's decode stage (JPEG draft, thread pool)
and prints images/s and the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from engine.core.config import DecodeConfig, FilterConfig, InputConfig
from engine.core.stage import ImageView
from engine.image.probe import probe_header
from engine.io.readers import ShardReport, read_shard
from engine.stages.decode import Decode
from engine.stages.probe import ResolutionFilter


def photo_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Smooth colour fields with noise: compresses like a photo (not like a flat test card)."""
    rng = np.random.default_rng(seed)
    sizes = [(1600, 1200), (1200, 1600), (1280, 960), (1920, 1080)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        base = Image.fromarray(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        noisy = np.asarray(base, dtype=np.int16) + rng.integers(-4, 4, (h, w, 3), dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=88)
        out.append(buffer.getvalue())
    return out


def write_shard(folder: Path, jpegs: list[bytes]) -> Path:
    import tarfile

    path = folder / "bench.tar"
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(jpegs):
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench io", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120, help="JPEGs in the tar (default: 120)")
    parser.add_argument("--threads", type=int, default=2, help="decode threads for the engine")
    parser.add_argument("--view", type=int, default=448, help="longer side of the decoded view")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        jpegs = photo_jpegs(args.images)
        shard = write_shard(Path(tmp), jpegs)
        mp = np.mean([np.prod(Image.open(io.BytesIO(j)).size) for j in jpegs]) / 1e6
        n = len(jpegs)

        def samples():
            return list(read_shard(shard, InputConfig(), ShardReport()))

        def baseline_check():
            for s in samples():
                with Image.open(io.BytesIO(s.image_bytes)) as image:
                    image.load()
                    _ = min(image.size) >= 448

        def engine_probe():
            for s in samples():
                header = probe_header(s.image_bytes)
                _ = min(header.width, header.height) >= 448

        def baseline_decode():
            for s in samples():
                with Image.open(io.BytesIO(s.image_bytes)) as image:
                    image = image.convert("RGB")
                    scale = args.view / max(image.size)
                    np.asarray(image.resize((round(image.width * scale), round(image.height * scale)),
                                            Image.Resampling.BICUBIC))

        probe_stage = ResolutionFilter(FilterConfig())

        def engine_decode(decoder: str) -> float:
            stage = Decode(DecodeConfig(decode_threads=args.threads, decoder=decoder), FilterConfig(),
                           (ImageView("embed", args.view),))
            stage.setup()

            def run():
                batch = samples()
                probe_stage.process(batch)
                for start in range(0, len(batch), 32):
                    stage.process(batch[start:start + 32])
                assert all(s.alive for s in batch)

            rate = timed(run, n)
            stage.teardown()
            return rate

        read_only = timed(samples, n)
        figures = {
            "baseline check (decode, then size)": timed(baseline_check, n),
            "header probe": timed(engine_probe, n),
            "baseline decode + resize": timed(baseline_decode, n),
            f"engine decode, pil ({args.threads} threads, draft)": engine_decode("pil"),
        }
        if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):
            figures[f"engine decode, dali cpu ({args.threads} threads)"] = engine_decode("dali")

    print(f"{n} JPEGs, mean {mp:.2f} MP; tar read alone: {read_only:,.0f} images/s")
    for name, rate in figures.items():
        print(f"  {name:<40} {rate:>10,.0f} images/s")
    values = list(figures.values())
    print(f"header probe vs decode-then-check: {values[1] / values[0]:.1f}x")
    print(f"engine decode (pil) vs baseline decode:  {values[3] / values[2]:.1f}x")
    if len(values) > 4:
        print(f"engine decode (dali cpu) vs baseline decode:  {values[4] / values[2]:.1f}x")
    return 0
