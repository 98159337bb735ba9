"""``stats``, ``report`` and ``export`` hold the same memory over 20× the shards (issue 23 item 2).
The benchmark's own measure at a small size; the figures at 1,000 and 50,000 shards come from
``python -m bench outputs --shards 1000``."""

import json

from bench import outputs


def test_peak_memory_of_the_output_commands_does_not_grow_with_the_shards(tmp_path, monkeypatch):
    from engine.output import dataset_reader

    monkeypatch.setattr(dataset_reader, "LIST_BATCH", 10)  # the listing's names, as over 1,000 shards
    results = outputs.bench((30, 600), rows=1, words=12, workdir=tmp_path)  # raises unless every sample is read
    small, big = results[30], results[600]
    for command in ("stats", "export"):
        # holding every shard's name (as before) puts +0.05 MB on these 570 more shards: 0.05 → 0.10 MB
        assert big[command].peak_mb < 1.3 * small[command].peak_mb + 0.02, command
    # the report's charts (matplotlib's SVG, ~3 MB) vary by up to ~1 MB with the digits in the figures
    assert big["report"].peak_mb < small["report"].peak_mb + 1.0
    assert not list(tmp_path.iterdir())  # the outputs are removed


def test_the_synthetic_output_is_read_back_as_written(tmp_path):
    from engine.io.manifest import read_manifest
    from engine.output.dataset_reader import iter_rejects, iter_samples

    out = outputs.write_output(tmp_path / "out", 11, 2, words=30)
    samples = list(iter_samples(out))
    assert [s.key for s in samples] == [f"{i:05d}{r:04d}" for i in range(11) for r in range(2)]
    assert all(len(s.caption.split()) == 30 for s in samples)
    assert [r["shard"] for r in iter_rejects(out)] == ["00000", "00004", "00008"]
    manifest = read_manifest(out)
    assert sum(e["written"] for e in manifest.values()) == 22 and sum(e["rejected"] for e in manifest.values()) == 3
    assert json.loads(json.dumps(samples[0].annotations)) == samples[0].annotations
