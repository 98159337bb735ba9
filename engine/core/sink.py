"""Where a pass's samples end: the one interface the driver writes through.

Pass 2's ``DatasetWriter`` (engine/io/writers.py) and pass 1's ``EmbeddingStore``
(engine/curate/store.py) both implement it; a benchmark's do-nothing writer needs only
``write`` and ``commit`` (all the runtime calls). Every sample reaches ``write`` (dead ones too: they are the rejects);
``commit`` makes a shard final and records it in the manifest, with its counts
(``samples``, ``written``, ``rejected``, ``rejected_by_stage``, ``errors``), from which the
driver derives the output's totals.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from engine.core.record import Sample, ShardEnd
from engine.io.manifest import Manifest


@runtime_checkable
class Sink(Protocol):
    manifest: Manifest  # finished shards with their counts, across every invocation
    committed: dict  # shard → its marker, for this writer's commits not yet taken by the driver
    written: int  # samples kept by this invocation
    rejected: int  # samples rejected by this invocation

    @property
    def finished(self) -> set[str]:
        """Shard names already committed: what a run skips."""

    def settle(self, shards: list[str]) -> None:
        """At a run's start: bring the manifest up to the shards' done markers (a writer killed
        between its marker and the manifest, or a Ray worker's commits); see engine/io/commit.py."""

    def remove_temporaries(self) -> None:
        """Remove the temporaries of writers no longer alive (only where none can be)."""

    def write(self, sample: Sample) -> None: ...

    def commit(self, end: ShardEnd) -> None: ...

    def close(self) -> None:
        """Drop what is not committed: an unfinished shard is redone by the next run."""
