"""Pass 2's overlap: wall time against the slowest stage's busy time, and images/s against a
paced caption engine's rate (do the experts hide behind the caption engine?).

The real stages of pass 2 with tiny random-weight experts (probe, decode, tag, detect, OCR on
the real PP-OCR models, prompt) feed a *paced* caption engine: a stage that takes exactly
``batch / rate`` seconds per batch and no CPU, standing in for a GPU engine of known speed.
One shard of photo-like scenes with every ``--text-every``-th image a poster with text.
Printed, after the models are loaded:

- wall time ÷ the slowest stage's busy time: 1.0 when the stages overlap perfectly (the run
  takes as long as its busiest stage), the number of stages when they run one after another;
- images/s ÷ the paced engine's rate: the share of the engine's speed the pipeline delivers
  (goal ≥ 0.9: the experts keep the engine fed); once over the whole run (which includes
  filling the pipeline: the engine's first batch waits for its images to pass every expert, a
  cost a run of millions of images pays once), and once from the engine's first batch on.

Pick ``--caption-rate`` below what the experts manage on the machine (the per-stage busy
rates are printed) — the goal is that the slowest stage, not the plumbing, sets the pace.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from engine.core.record import Sample
from engine.core.stage import Resources, Stage


class PacedCaptionEngine(Stage):
    """A caption engine of known rate that uses no CPU (a GPU engine's stand-in)."""

    name = "caption"

    def __init__(self, rate: float, batch_size: int):
        self.rate, self.batch_size = rate, batch_size
        self.first_batch_at: float | None = None  # perf_counter() when the first batch came

    def resources(self) -> Resources:
        return Resources(batch_size=self.batch_size)

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self.first_batch_at is None:
            self.first_batch_at = time.perf_counter()
        time.sleep(len(batch) / self.rate)
        return batch

    def describe(self) -> str:
        return f"caption (paced: {self.rate:g} images/s, batches of {self.batch_size})"


class CountingWriter:
    """Keeps nothing: the benchmark measures the stages, not the disk."""

    def __init__(self):
        self.written = 0

    def write(self, sample: Sample) -> None:
        self.written += 1

    def commit(self, end) -> None:
        pass


def write_shard(folder: Path, n: int, text_every: int) -> Path:
    import random

    from engine.io.demo_data import POSTER_LINES, DemoMember, _jpeg, shapes_image, text_image, write_tar

    rng = random.Random(0)
    members = []
    for i in range(n):
        if text_every and i % text_every == text_every - 1:
            lines = POSTER_LINES[i % len(POSTER_LINES)]
            image = text_image(lines, 640, 900, (250, 240, 200), (20, 20, 80))
        else:
            image = shapes_image(rng, *rng.choice([(800, 600), (1024, 576), (720, 720)]))
        members.append(DemoMember(f"{i:06d}", _jpeg(image), "jpg", "shapes on a table", {}))
    path = folder / "bench-00000.tar"
    write_tar(path, members)
    return path


def measure(images: int, rate: float, caption_batch: int, text_every: int, stages: tuple[str, ...]) -> dict:
    from engine.core import config
    from engine.core.driver import shard_source
    from engine.core.pipeline import build_stages, resolved
    from engine.core.runtime import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        shard = write_shard(Path(tmp), images, text_every)
        cfg = resolved(config.build(input={"shards": (str(shard),)}, experts={"expert_cache": "off"},  # measure the experts
                                    runtime={"out": f"{tmp}/out", "models": "tiny", "progress": False,
                                             "stages": stages, "device": "cpu"}))
        engine = PacedCaptionEngine(rate, caption_batch)
        built = [s for s in build_stages(cfg) if getattr(s, "name", "") != "caption"] + [engine]
        pipeline = Pipeline(built, cfg.runtime.queue_depth, max_bytes_in_flight=cfg.runtime.max_bytes_in_flight)
        writer = CountingWriter()
        start = time.perf_counter()
        pipeline.run(shard_source([shard], cfg, set()), writer)
        end = time.perf_counter()
        wall = end - start - pipeline.ready_s
    busy = {m.name: m.busy_s for m in pipeline.metrics}
    captioned = next(m.items for m in pipeline.metrics if m.name == "caption")
    slowest = max(busy, key=busy.get)
    return {
        "images": images, "captioned": captioned, "caption_rate": rate, "wall_s": wall,
        "load_s": pipeline.ready_s, "busy_s": busy, "items": {m.name: m.items for m in pipeline.metrics},
        "slowest_stage": slowest, "wall_over_slowest_busy": wall / busy[slowest],
        "images_per_s": captioned / wall, "share_of_caption_rate": captioned / wall / rate,
        "fill_s": engine.first_batch_at - start - pipeline.ready_s,
        "share_after_fill": captioned / (end - engine.first_batch_at) / rate,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images in the shard")
    parser.add_argument("--caption-rate", type=float, default=2.0, help="the paced engine's images/s")
    parser.add_argument("--caption-batch", type=int, default=8, help="the paced engine's batch")
    parser.add_argument("--text-every", type=int, default=4, help="every N-th image is a poster with text (0: none)")
    parser.add_argument("--stages", nargs="+", default=["tag", "detect", "ocr", "prompt", "caption"],
                        help="stages before the paced engine (probe and decode always run)")
    args = parser.parse_args(argv)
    stages = tuple(dict.fromkeys([*args.stages, "decode", "caption"]))
    r = measure(args.images, args.caption_rate, args.caption_batch, args.text_every, stages)
    print(f"pipeline: {r['images']} images, tiny experts on the CPU, paced caption engine at "
          f"{r['caption_rate']:g} images/s (models loaded in {r['load_s']:.1f}s, not counted)")
    for name, busy in r["busy_s"].items():
        items = r["items"][name]
        print(f"  {name:<10} {items:>5} items  busy {busy:6.2f}s  ({items / busy if busy else 0:7.1f} items/busy s)")
    print(f"wall {r['wall_s']:.2f}s / slowest stage's busy time ({r['slowest_stage']}) "
          f"{r['busy_s'][r['slowest_stage']]:.2f}s = {r['wall_over_slowest_busy']:.2f}  (1.00 = full overlap)")
    print(f"{r['images_per_s']:.2f} images/s / paced engine {r['caption_rate']:g} images/s = "
          f"{r['share_of_caption_rate']:.2f}  (goal >= 0.9)")
    print(f"  from the engine's first batch on (the first {r['fill_s']:.1f}s filled the pipeline): "
          f"{r['share_after_fill']:.2f} of the engine's rate")
    return 0
