import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg, sample_members, write_tar

from engine.core.config import InputConfig
from engine.io.readers import (
    ShardReport,
    expand_braces,
    expand_shards,
    read_shard,
    split_member_name,
)
from models.errors import ConfigError


def read(path, cfg=InputConfig()):
    report = ShardReport()
    return list(read_shard(path, cfg, report)), report


def test_expand_braces_keeps_zero_padding_and_lists():
    assert expand_braces("s{008..011}.tar") == ["s008.tar", "s009.tar", "s010.tar", "s011.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]


def test_expand_shards_globs_and_rejects_missing(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:03d}.tar", [])
    assert [p.name for p in expand_shards([str(tmp_path / "*.tar")])] == ["000.tar", "001.tar", "002.tar"]
    assert len(expand_shards([str(tmp_path / "{000..001}.tar")])) == 2
    with pytest.raises(ConfigError, match="3 input shards .* do not exist"):
        expand_shards([str(tmp_path / "{000..005}.tar")])


def test_two_inputs_with_one_output_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_tar(tmp_path / "a" / "x.tar", [])
    write_tar(tmp_path / "b" / "x.tar", [])
    with pytest.raises(ConfigError, match="same output name"):
        expand_shards([str(tmp_path / "a" / "x.tar"), str(tmp_path / "b" / "x.tar")])


def test_tar_groups_members_by_key_and_keeps_metadata_and_offsets(tmp_path):
    image = jpeg(500, 600)
    path = write_tar(tmp_path / "s.tar", sample_members("k1", image, "a red box", width=500)
                     + sample_members("k2", jpeg(640, 480), "second", ext="png"))
    samples, report = read(path)
    assert [s.key for s in samples] == ["k1", "k2"]
    assert report.n_samples == 2 and not report.errors
    first = samples[0]
    assert first.alive and first.alt_text == "a red box"
    assert first.meta == {"url": "http://x/k1", "width": 500}
    assert first.image_bytes == image and first.image_ext == "jpg"
    assert samples[1].image_ext == "png"
    # the recorded offset/size let a later pass read the member without scanning the tar
    with open(path, "rb") as handle:
        handle.seek(first.source.offset)
        assert handle.read(first.source.size) == image


def test_member_name_split_follows_webdataset():
    assert split_member_name("dir/000123.seg.png") == ("dir/000123", "seg.png")
    assert split_member_name("abc.JPG") == ("abc", "jpg")
    assert split_member_name("/abs.jpg") == ("/abs", "jpg")  # the slash stays: an absolute key


def test_hostile_names_become_rejected_samples_and_good_ones_survive(tmp_path):
    members = (sample_members("good1", jpeg(500, 500))
               + [("../evil.jpg", jpeg(500, 500)), ("/etc/abs.jpg", jpeg(500, 500)),
                  ("ctl\x07.jpg", jpeg(500, 500))]
               + sample_members("good2", jpeg(500, 500)))
    samples, _ = read(write_tar(tmp_path / "h.tar", members))
    alive = [s.key for s in samples if s.alive]
    dead = {s.key: s.reason for s in samples if not s.alive}
    assert alive == ["good1", "good2"]
    assert len(dead) == 3
    assert any("escapes" in r for r in dead.values())
    assert any("absolute" in r for r in dead.values())
    assert any("control character" in r for r in dead.values())
    assert not any((tmp_path / p).exists() for p in ("evil.jpg", "../evil.jpg"))


def test_truncated_tar_keeps_earlier_samples_and_reports_the_shard(tmp_path):
    members = [m for i in range(6) for m in sample_members(f"k{i}", jpeg(500, 500, (i * 40, 0, 0)))]
    path = write_tar(tmp_path / "t.tar", members)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    samples, report = read(path)
    good = [s for s in samples if s.alive]
    assert 2 <= len(good) < 6
    assert all(s.image_bytes for s in good)
    assert report.errors and "ends early" in report.errors[0]


def test_alt_text_non_utf8_and_huge_is_cleaned_and_capped(tmp_path):
    path = write_tar(tmp_path / "a.tar", [("k.jpg", jpeg(500, 500)), ("k.txt", b"caf\xe9 " + b"x" * 10_000)])
    samples, _ = read(path, InputConfig(max_alt_text_chars=100))
    assert samples[0].alive
    assert samples[0].alt_text.startswith("caf\ufffd ") and len(samples[0].alt_text) == 100


def test_duplicate_key_keeps_the_first_and_rejects_the_copy_under_its_own_key(tmp_path):
    path = write_tar(tmp_path / "d.tar", sample_members("k", jpeg(500, 500), "first")
                     + [("x.jpg", jpeg(500, 500))] + sample_members("k", jpeg(500, 500), "second"))
    samples, _ = read(path)
    assert [(s.key, s.alive) for s in samples] == [("k", True), ("x", True), ("k\\#2", False)]
    assert samples[0].alt_text == "first" and "duplicate key 'k'" in samples[2].reason


# Item 5 of issue 21: members of one key apart from each other. Each order is a family: the
# image's run first or last, one or more runs between, sidecars or images apart.
@pytest.mark.parametrize("order, written, rejected", [
    (["k.jpg", "j.jpg", "k.txt"], {"k", "j"}, {"k\\#2"}),  # used to write k and reject k
    (["k.txt", "j.jpg", "k.jpg"], {"k", "j"}, {"k\\#2"}),  # used to reject the intact image
    (["k.txt", "j.jpg", "k.json", "i.jpg", "k.jpg", "k.txt"], {"k", "j", "i"}, {"k\\#2", "k\\#3"}),
    (["k.txt", "j.jpg", "k.json"], {"j"}, {"k", "k\\#2"}),  # no run of k has an image
    (["k.jpg", "j.jpg", "k.jpg", "j.txt", "k.png"], {"k", "j"}, {"k\\#2", "j\\#2", "k\\#3"}),
])
def test_members_of_one_key_apart_are_two_samples_each_key_given_out_once(tmp_path, order, written, rejected):
    members = [(name, jpeg(40, 40) if name.endswith(("jpg", "png")) else b"{}" if name.endswith("json") else b"t")
               for name in order]
    samples, report = read(write_tar(tmp_path / "o.tar", members))
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys)) == report.n_samples
    assert {s.key for s in samples if s.alive} == written
    dead = {s.key: s.reason for s in samples if not s.alive}
    assert set(dead) == rejected
    assert all(reason.startswith("duplicate key") or "no image member" in reason for reason in dead.values())
    if "k" in written:  # the run with the image is k's sample, whatever came before it
        (k,) = [s for s in samples if s.key == "k"]
        assert k.source.member.endswith((".jpg", ".png")) and k.image_bytes


def test_absolute_member_names_are_rejected_and_never_merge_with_relative_ones(tmp_path):
    """Item 2 of issue 21: ``/x.jpg`` used to key as ``x`` and merge with ``x.jpg``."""
    members = [("/x.jpg", jpeg(40, 40)), ("/x.txt", b"abs"), ("x.jpg", jpeg(40, 40)), ("x.txt", b"rel"),
               ("/y.jpg", jpeg(40, 40)), ("//z.jpg", jpeg(40, 40)), ("/d/w.jpg", jpeg(40, 40))]
    samples, _ = read(write_tar(tmp_path / "a.tar", members))
    by_key = {s.key: s for s in samples}
    assert set(by_key) == {"/x", "x", "/y", "//z", "/d/w"}
    assert by_key["x"].alive and by_key["x"].alt_text == "rel"
    assert all("absolute" in by_key[k].reason for k in ("/x", "/y", "//z", "/d/w"))


def test_sample_without_image_is_rejected(tmp_path):
    samples, _ = read(write_tar(tmp_path / "n.tar", [("k.txt", b"only text")]))
    assert not samples[0].alive and "no image member" in samples[0].reason


def test_parquet_with_bytes_and_hf_image_struct(tmp_path):
    table = pa.table({"key": ["a", "b", "c"],
                      "image": [{"bytes": jpeg(500, 500), "path": "a.jpg"}, {"bytes": jpeg(600, 500), "path": None},
                                {"bytes": None, "path": None}],
                      "caption": ["first", "second", None], "url": ["u1", "u2", "u3"]})
    pq.write_table(table, tmp_path / "p.parquet")
    samples, report = read(tmp_path / "p.parquet")
    assert [s.key for s in samples] == ["a", "b", "c"] and report.n_samples == 3
    assert samples[0].alt_text == "first" and samples[0].meta == {"url": "u1"}
    assert samples[1].alive and samples[1].image_bytes[:2] == b"\xff\xd8"
    assert not samples[2].alive and "no bytes" in samples[2].reason


def test_parquet_without_image_column_is_a_config_error(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="--image-column"):
        read(tmp_path / "bad.parquet")


def test_folder_reader_uses_sidecar_text(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "one.jpg").write_bytes(jpeg(500, 500))
    (folder / "sub" / "one.txt").write_text("sidecar alt")
    (folder / "notes.md").write_text("ignored")
    samples, _ = read(folder)
    assert [(s.key, s.alt_text) for s in samples] == [("sub/one", "sidecar alt")]
