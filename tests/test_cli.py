import json
import re

import pytest
from conftest import jpeg, sample_members, write_tar

import densefusion_local
from engine.core import config
from engine.io.manifest import read_manifest
from models.errors import ConfigError


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


@pytest.mark.parametrize("shards, said", [
    (["nope*.tar"], "--shards pattern '{d}/nope*.tar' matches no file"),
    (["{{000..005}}.tar"], "3 input shards '{d}/003.tar', '{d}/004.tar', '{d}/005.tar' do not exist"),
    (["{{000..010}}.tar"], "8 input shards '{d}/003.tar', '{d}/004.tar', '{d}/005.tar', '{d}/006.tar', "
                           "'{d}/007.tar' and 3 more do not exist"),
    (["000.tar", "empty", "no_images"], "2 image folders '{d}/empty', '{d}/no_images' hold no image file"),
    (["x*.tar", "009.tar", "empty"], "--shards pattern '{d}/x*.tar' matches no file; input shard '{d}/009.tar' "
                                     "does not exist; image folder '{d}/empty' holds no image file"),
])
def test_input_problems_are_all_named_before_any_model_loads(tmp_path, capsys, monkeypatch, shards, said):
    from models.base import ModelRef

    def no_model(*_):
        raise AssertionError("a model was loaded for inputs that cannot run")

    monkeypatch.setattr(ModelRef, "resolve", no_model)
    for i in range(3):
        write_tar(tmp_path / f"{i:03d}.tar", sample_members(f"k{i}", jpeg(500, 500)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "sub").mkdir(parents=True)
    (tmp_path / "no_images" / "sub" / "notes.txt").write_text("alt text without its image")
    argv = [str(tmp_path / s) for s in shards]
    assert cli("run", "--shards", *argv, "--out", str(tmp_path / "out"), "--models", "tiny", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said.format(d=tmp_path) in err
    assert not (tmp_path / "out").exists()


def test_html_entities_in_alt_text_are_unescaped_once_and_kept_raw(tmp_path, capsys):
    """LAION alt text often arrives HTML-escaped: the prompt, the parquet and the exports get
    the text a reader saw; ``&amp;amp;`` (an escaped '&amp;') becomes '&amp;', not '&'."""
    import pyarrow.parquet as pq

    from bench._chat_server import ChatServer

    alts = {"k0": "bike &amp; pickup truck", "k1": "Tom&#39;s &quot;Diner&quot;", "k2": "&amp;amp; is an entity",
            "k3": "AT&T store, ?a=1&para=2"}
    members = [m for i, (key, alt) in enumerate(alts.items()) for m in sample_members(key, jpeg(500, 500, (60 * i, 0, 0)), alt)]
    write_tar(tmp_path / "in.tar", members)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "f0.jpg").write_bytes(jpeg(500, 500))
    (folder / "f0.txt").write_text("fish &amp; chips")
    out = tmp_path / "out"
    with ChatServer(output_words=20) as server:
        assert cli("run", "--shards", str(tmp_path / "in.tar"), str(folder), "--out", str(out),
                   "--stages", "decode", "prompt", "caption", "--caption-backend", "openai",
                   "--api-base", server.url, "--api-model", "m", "--no-progress", "--device", "cpu") == 0
    rows = {r["key"]: r for name in ("in", "folder") for r in pq.read_table(out / "shards" / f"{name}.parquet").to_pylist()}
    read = {"k0": "bike & pickup truck", "k1": 'Tom\'s "Diner"', "k2": "&amp; is an entity",
            "k3": "AT&T store, ?a=1&para=2", "f0": "fish & chips"}
    assert {key: row["alt_text"] for key, row in rows.items()} == read
    assert all(read[key] in row["prompt"] and "&amp; chips" not in row["prompt"] for key, row in rows.items())
    raw = {key: json.loads(row["meta"]["other"] or "{}").get("alt_text_raw") for key, row in rows.items()}
    assert raw == {"k0": alts["k0"], "k1": alts["k1"], "k2": alts["k2"], "k3": None, "f0": "fish &amp; chips"}
    assert cli("export", "sft", str(out), "--to", str(tmp_path / "sft")) == 0
    human = {r["id"]: r["conversations"][0]["value"] for r in json.loads((tmp_path / "sft" / "densefusion_sft.json").read_text())}
    assert "bike & pickup truck" in human["in/k0"] and "fish & chips" in human["folder/f0"]
    assert "&amp; is an entity" in human["in/k2"] and not any("&amp; chips" in h for h in human.values())
    capsys.readouterr()


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


OUTPUT_FLAGS = {  # every command that writes into a folder it is given, and that flag
    "run": lambda d, out: ["run", "--shards", str(d / "in.tar"), "--out", out],
    "curate": lambda d, out: ["curate", "--shards", str(d / "in.tar"), "--out", out],
    "demo": lambda d, out: ["demo", "--out", out],
    "meta": lambda d, out: ["meta", "--shards", str(d / "in.tar"), "--out", out,
                            "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m"],
    "plan": lambda d, out: ["plan", "--out", out],
    "train": lambda d, out: ["train", str(d), "--base", "tiny", "--out", out],
    "export": lambda d, out: ["export", "llava", str(d), "--to", out],
}


@pytest.mark.parametrize("under_a_file", [False, True], ids=["file", "under-a-file"])
@pytest.mark.parametrize("command", OUTPUT_FLAGS)
def test_every_output_folder_that_is_a_file_gets_one_message_and_exit_2(tmp_path, capsys, command, under_a_file):
    write_tar(tmp_path / "in.tar", sample_members("k", jpeg(500, 500)))
    taken = tmp_path / "taken"
    taken.write_text("")
    out = taken / "sub" if under_a_file else taken
    assert cli(*OUTPUT_FLAGS[command](tmp_path, str(out))) == 2
    flag = "--to" if command == "export" else "--out"
    expected = (f"error: {flag} {out} is not writable: {taken} is a file, not a folder\n" if under_a_file else
                f"error: {flag} {out} is a file, not a folder: pass a folder (it is created if missing)\n")
    assert capsys.readouterr().err == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tar", "taken"]  # nothing written


COMMANDS = ("run", "curate", "demo", "meta", "plan")


def help_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli(*argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def listed_flags(text: str) -> set[str]:
    return set(re.findall(r"^  (--[a-z0-9-]+)", text, re.MULTILINE))  # option lines, not wrapped help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_the_commands_own_options_grouped_with_readable_placeholders(capsys, command):
    short, full = help_of(capsys, command, "--help"), help_of(capsys, command, "--help-all")
    assert len(short.splitlines()) < 150 and len(short.splitlines()) < len(full.splitlines()) / 2 + 50
    assert re.search(rf"\d+ more options of {command}: --help-all lists every one", short)
    assert "more options of" not in full
    # exactly the options declared to apply to the command (option(commands=) or the section's COMMANDS)
    applies = {flag for flag, commands in config.option_commands().items() if command in commands}
    assert listed_flags(full) & set(config.option_commands()) == applies
    assert listed_flags(short) < listed_flags(full)
    assert not re.search(r"\b[A-Z]+\.[A-Z_]+\b", full)  # no internal SECTION.FIELD placeholders
    assert "resolution filter:" in full or command == "plan"  # groups carry readable titles


def test_run_help_placeholders_and_one_default_each(capsys):
    text = help_of(capsys, "run", "--help")
    assert "--shards PATTERN" in text and "--min-short-edge PX" in text and "--out DIR" in text
    stages = text[text.index("  --stages"):text.index("  --device")]
    assert stages.count("default") == 1, stages


def test_demo_has_no_shards_option_and_refuses_one(capsys):
    assert "--shards" not in help_of(capsys, "demo", "--help-all")
    with pytest.raises(SystemExit) as exit_:
        cli("demo", "--shards", "x.tar", "--out", "unused")
    assert exit_.value.code == 2
    assert "--shards does not apply to demo (only to run, curate, meta)" in capsys.readouterr().err


def test_top_level_help_names_every_export_kind(capsys):
    text = help_of(capsys, "--help")
    export = text[text.index("    export"):text.index("    report")]
    for kind in ("llava", "jsonl", "sft"):
        assert kind in export
