import pytest

from engine.core.config import SubsetConfig
from engine.core.record import Sample, ShardEnd, Source
from engine.core.subset import in_subset, take_subset
from models.errors import ConfigError


def _items(keys):
    return [Sample(key=k, source=Source(shard="s", path="p", member=k)) for k in keys] + [ShardEnd("s", "p", len(keys))]


def test_the_draw_is_seeded_and_order_free():
    keys = [f"{i:06d}" for i in range(5000)]
    picked = {k for k in keys if in_subset(k, 0.1, seed=7)}
    assert 400 < len(picked) < 600  # ~10%
    assert picked == {k for k in reversed(keys) if in_subset(k, 0.1, seed=7)}
    assert picked != {k for k in keys if in_subset(k, 0.1, seed=8)}
    assert picked <= {k for k in keys if in_subset(k, 0.3, seed=7)}  # shares nest
    assert all(in_subset(k, 1.0, seed=7) for k in keys)


def test_samples_left_out_are_filtered_with_a_reason_and_nothing_is_lost():
    items = _items([f"k{i}" for i in range(200)])
    out = list(take_subset(iter(items), SubsetConfig(subset_share=0.25, subset_seed=1)))
    assert out == items  # same objects, same order, shard end included
    samples = [s for s in out if isinstance(s, Sample)]
    kept = [s for s in samples if s.alive]
    assert kept and len(kept) < 100
    assert all(in_subset(s.key, 0.25, 1) for s in kept)
    dropped = [s for s in samples if not s.alive]
    assert {(s.status, s.stage) for s in dropped} == {("filtered", "subset")}
    assert "seed 1" in dropped[0].reason
    everything = _items(["a", "b"])
    assert all(s.alive for s in take_subset(iter(everything), SubsetConfig()) if isinstance(s, Sample))


@pytest.mark.parametrize("share", [0.0, 1.5, -0.1])
def test_share_must_be_a_fraction(share):
    with pytest.raises(ConfigError):
        SubsetConfig(subset_share=share).validate()


def test_a_run_writes_the_subset_and_rejects_the_rest(tmp_path):
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from engine.core import config, pipeline

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, format="JPEG")
    keys = [f"k{i:03d}" for i in range(40)]

    def source(skip):
        for sample in _items(keys):
            if isinstance(sample, Sample):
                sample.image_bytes = buf.getvalue()
            yield sample

    cfg = config.build(runtime={"out": str(tmp_path), "stages": ("probe",), "progress": False},
                       filter={"min_short_edge": 0}, subset={"subset_share": 0.5, "subset_seed": 3})
    summary = pipeline.run(cfg, source_paths=[], source=source)
    written = {r["key"] for r in pq.read_table(tmp_path / "shards" / "s.parquet").to_pylist()}
    rejected = pq.read_table(tmp_path / "rejects" / "s.parquet").to_pylist()
    assert written == {k for k in keys if in_subset(k, 0.5, 3)}
    assert {r["key"] for r in rejected} == set(keys) - written and {r["stage"] for r in rejected} == {"subset"}
    assert summary.rejects_by_stage == {"subset": len(rejected)}
