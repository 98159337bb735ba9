import json

import pytest
from conftest import jpeg, sample_members, write_tar

import densefusion_local
from engine.core import config
from engine.core.errors import ConfigError
from engine.io.manifest import read_manifest


def cli(*argv) -> int:
    return densefusion_local.main(list(argv))


def test_help_lists_stages_and_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("run", "--help")
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    for expected in ("--shards", "--min-short-edge", "--out", "--stages", "probe, decode"):
        assert expected in text


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"filter: {{min_short_edge: 300, max_pixels: 1000000}}\nruntime: {{out: {tmp_path}}}\n")
    parser = densefusion_local.build_parser()
    args = parser.parse_args(["run", "--config", str(yaml_file), "--min-short-edge", "512", "--stages", "probe", "decode"])
    cfg = config.build(args, args.config)
    assert cfg.filter.min_short_edge == 512 and cfg.filter.max_pixels == 1_000_000
    assert cfg.runtime.stages == ("probe", "decode") and cfg.runtime.out == str(tmp_path)
    assert cfg.decode.decode_batch == config.DecodeConfig().decode_batch


def test_unknown_yaml_keys_are_refused(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("filter: {min_short_egde: 300}\n")
    with pytest.raises(ConfigError, match="min_short_egde"):
        config.build(None, str(yaml_file), runtime={"out": str(tmp_path)})


def test_yaml_values_outside_a_fields_choices_are_refused(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("caption: {caption_decode: jit}\n")
    with pytest.raises(ConfigError, match="caption.caption_decode: 'jit' is not one of auto, dynamic"):
        config.build(None, str(yaml_file), runtime={"out": str(tmp_path)})


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["--shards", str(d / "missing.tar"), "--out", str(d / "out")], "does not exist"),
    (lambda d: ["--shards", str(d / "in.tar"), "--out", str(d / "in.tar" / "out")], "not writable"),
    (lambda d: ["--shards", str(d / "in.tar"), "--out", str(d / "out"), "--device", "cuda"], "GPU"),
    (lambda d: ["--shards", str(d / "in.tar"), "--out", str(d / "out"), "--stages", "nope"], "unknown stage"),
    (lambda d: ["--shards", str(d / "in.tar"), "--out", str(d / "out"), "--decode-threads", "0"], ">= 1"),
])
def test_misconfiguration_exits_2_before_writing_anything(tmp_path, capsys, make_args, message):
    write_tar(tmp_path / "in.tar", sample_members("k", jpeg(500, 500)))
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available() and "cuda" in make_args(tmp_path):
        pytest.skip("a GPU is present")
    assert cli("run", *make_args(tmp_path), "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_run_on_a_parquet_and_a_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["p1", "p2"], "jpg": [jpeg(500, 500), jpeg(100, 100)],
                             "caption": ["one", "two"]}), tmp_path / "pq.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "f1.png").write_bytes(jpeg(600, 600))  # wrong extension: the header decides
    assert cli("run", "--shards", str(tmp_path / "pq.parquet"), str(folder), "--out", str(tmp_path / "out"),
               "--no-progress", "--stages", "decode") == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["pq"]["written"] == 1 and manifest["pq"]["rejected"] == 1
    assert manifest["folder"]["written"] == 1
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]][:2] == ["probe", "decode"]
    assert metrics["written"] == 2 and metrics["images_per_s"] > 0
