"""The output contract, checked the same way by every end-to-end test."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from engine.core.config import InputConfig
from engine.io.manifest import read_manifest
from engine.io.object_output import OutPath
from engine.io.readers import ShardReport, read_shard, shard_name


def input_keys(path: Path) -> list[str]:
    return [s.key for s in read_shard(path, InputConfig(), ShardReport())]


def output_rows(out: OutPath, shard: str) -> tuple[list[dict], list[dict]]:
    """``out``: a local folder or an output on object storage (opened the same way)."""
    def rows(path: OutPath) -> list[dict]:
        with path.open("rb") as handle:
            return pq.read_table(handle).to_pylist()

    return rows(out / "shards" / f"{shard}.parquet"), rows(out / "rejects" / f"{shard}.parquet")


def check_output_contract(out: OutPath, inputs: list[Path]) -> dict[str, tuple[list[dict], list[dict]]]:
    """Every key the reader gives out lands exactly once: written xor rejected (a repeated input key
    is given out once, its other samples as ``key\\#n``). Tar and parquet agree; the manifest
    counts match."""
    manifest = read_manifest(out)
    result = {}
    for path in inputs:
        shard = shard_name(path)
        written, rejected = output_rows(out, shard)
        keys_in = input_keys(path)
        assert len(keys_in) == len(set(keys_in)), "the reader gave out a key twice"
        written_keys = [r["key"] for r in written]
        rejected_keys = [r["key"] for r in rejected]
        assert len(written_keys) == len(set(written_keys)), "a key written twice"
        assert Counter(written_keys) + Counter(rejected_keys) == Counter(keys_in), "keys lost or invented"
        assert not set(written_keys) & set(rejected_keys), "a key both written and rejected"
        assert all(r["stage"] and r["reason"] for r in rejected), "a reject without stage or reason"
        with (out / "shards" / f"{shard}.tar").open("rb") as handle, tarfile.open(fileobj=handle) as tar:
            names = tar.getnames()
            for key in written_keys:
                assert f"{key}.json" in names
                annotations = json.load(tar.extractfile(f"{key}.json"))
                assert annotations["key"] == key
        assert len(names) == 2 * len(written_keys)
        assert manifest[shard]["written"] == len(written) and manifest[shard]["rejected"] == len(rejected)
        result[shard] = (written, rejected)
    return result
