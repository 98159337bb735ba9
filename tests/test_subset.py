import pytest

from engine.config import SubsetConfig
from engine.errors import ConfigError
from engine.record import Sample, Source
from engine.stages.subset import SeededSubset, in_subset


def _samples(keys):
    return [Sample(key=k, source=Source(shard="s", path="p", member=k)) for k in keys]


def test_the_draw_is_seeded_and_order_free():
    keys = [f"{i:06d}" for i in range(5000)]
    picked = {k for k in keys if in_subset(k, 0.1, seed=7)}
    assert 400 < len(picked) < 600  # ~10%
    assert picked == {k for k in reversed(keys) if in_subset(k, 0.1, seed=7)}
    assert picked != {k for k in keys if in_subset(k, 0.1, seed=8)}
    assert picked <= {k for k in keys if in_subset(k, 0.3, seed=7)}  # shares nest
    assert all(in_subset(k, 1.0, seed=7) for k in keys)


def test_stage_filters_the_rest_with_a_reason():
    batch = _samples([f"k{i}" for i in range(200)])
    SeededSubset(SubsetConfig(subset_share=0.25, subset_seed=1)).process(batch)
    kept = [s for s in batch if s.alive]
    assert kept and len(kept) < 100
    assert all(in_subset(s.key, 0.25, 1) for s in kept)
    dropped = [s for s in batch if not s.alive]
    assert {(s.status, s.stage) for s in dropped} == {("filtered", "subset")}
    assert "seed 1" in dropped[0].reason
    everything = _samples(["a", "b"])
    SeededSubset(SubsetConfig()).process(everything)
    assert all(s.alive for s in everything)


@pytest.mark.parametrize("share", [0.0, 1.5, -0.1])
def test_share_must_be_a_fraction(share):
    with pytest.raises(ConfigError):
        SubsetConfig(subset_share=share).validate()
