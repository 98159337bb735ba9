"""The embedding store: per-shard commits, and rows of an unfinished shard never survive."""

import numpy as np

from engine.core.record import Sample, ShardEnd, Source
from engine.curate.store import EmbeddingStore


def samples(shard: str, n: int, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = Sample(f"{shard}-{i}", Source(shard, f"/in/{shard}.tar", f"{i}.jpg", 512 * i, 100 + i),
                   alt_text=f"alt {i}", width=640, height=480)
        v = rng.standard_normal(dim).astype(np.float32)
        s.embedding = v / np.linalg.norm(v)
        out.append(s)
    return out


def commit(store, shard, items):
    for s in items:
        store.write(s)
    store.commit(ShardEnd(shard, f"/in/{shard}.tar", len(items)))


def test_killed_shard_is_overwritten_and_index_matches_rows(tmp_path):
    store = EmbeddingStore(tmp_path, chunk_rows=4)
    a, b, c = samples("a", 5, seed=1), samples("b", 7, seed=2), samples("c", 3, seed=3)
    a[2].filter("probe", "short edge 100 < --min-short-edge 448")
    a[2].embedding = None
    commit(store, "a", a)
    # shard b is written but the process dies before commit: rows exist, manifest has no b
    for s in b:
        store.write(s)
    store.array.resize((4 + 7, 8))
    store.array[4:11] = np.ones((7, 8), np.float16)

    store = EmbeddingStore(tmp_path)  # rerun
    assert store.finished == {"a"} and store.rows == 4
    commit(store, "c", c)
    commit(store, "b", b)
    index = store.consolidate().to_pylist()
    assert [r["key"] for r in index] == [s.key for s in a if s.alive] + [s.key for s in c + b]
    assert [r["row"] for r in index] == list(range(14))
    vectors = store.embeddings()[0:14]
    expected = np.stack([s.embedding for s in a if s.alive] + [s.embedding for s in c + b])
    np.testing.assert_allclose(vectors.astype(np.float32), expected, atol=1e-3)
    assert index[4]["offset"] == 0 and index[4]["size"] == 100 and index[4]["alt_text"] == "alt 0"
    rejects = store.rejects().to_pylist()
    assert [(r["key"], r["stage"], r["status"]) for r in rejects] == [("a-2", "probe", "filtered")]
