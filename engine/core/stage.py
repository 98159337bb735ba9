"""The stage contract: one small class per step of a pass.

``setup()`` loads models once (in the stage's thread), ``process(batch)`` returns the same
samples it was given (same length, same order) after filling in fields or recording a failure
on a sample, ``teardown()`` frees resources. The runtime owns threads, queues, batching,
metrics and progress; a stage never sees a dead sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.record import Sample


@dataclass(frozen=True)
class Resources:
    """What a stage asks of the runtime."""

    batch_size: int = 1
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    # Batches in process() at once, each on its own thread; above 1 only for a thread-safe
    # process(). A backend that keeps a window of requests in flight gets its next batch while
    # the last requests of one finish (caption); per-image CPU work runs in parallel (OCR).
    workers: int = 1


@dataclass(frozen=True)
class ImageView:
    """A decoded view a stage needs: RGB, longer side at most ``max_side`` (never upscaled).

    The decode stage decodes each image once, at the smallest scale that still serves the
    largest view, and resizes from there for every view.
    """

    name: str
    max_side: int


class Stage:
    name: str = "stage"

    def resources(self) -> Resources:
        return Resources()

    def views(self) -> tuple[ImageView, ...]:
        """Decoded views this stage reads from ``sample.views``."""
        return ()

    def setup(self) -> None:
        """Load models; called once, in the thread that calls ``process`` (with
        ``resources().workers`` above 1, ``process`` also runs on that many helper threads)."""

    def process(self, batch: list[Sample]) -> list[Sample]:
        raise NotImplementedError

    def teardown(self) -> None:
        """Free what ``setup`` loaded."""

    def describe(self) -> str:
        """One line for logs and metrics: model, backend, device."""
        return self.name

    def progress(self) -> dict[str, str]:
        """A few live figures for the progress bar (e.g. tokens/s). Called from the main
        thread while ``process`` runs in the stage's own: plain reads of counters only."""
        return {}


def run_per_sample(stage: str, batch: list[Sample], fn) -> list[Sample]:
    """Apply ``fn(sample)`` to each sample, turning an exception into a failure on that sample.

    For stages whose work is per image: one bad image must not take its batch with it.
    """
    for sample in batch:
        try:
            fn(sample)
        except Exception as exc:  # noqa: BLE001 - any per-sample failure is data
            sample.fail(stage, f"{type(exc).__name__}: {exc}")
    return batch
