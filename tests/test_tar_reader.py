"""Issue 17's corpus, built in code: crashes, a hang, silent key loss, key collisions,
unbounded memory. Each shard must read to the end: every key whose header survives is a
sample (alive, or rejected with a reason), and lost bytes are shard errors with their range."""

from __future__ import annotations

import io
import time

import pytest
from conftest import jpeg
from contract import check_output_contract
from tar_corpus import END, GNU, Archive, gz, header, long_name, member, pad, pax

import densefusion_local
from engine.core.config import InputConfig
from engine.io.manifest import read_manifest
from engine.io.readers import shard_items
from engine.io.tar import TarReader

IMAGE = jpeg(500, 500)


def read(path, cfg=InputConfig()):
    items = list(shard_items(path, cfg))
    end = items.pop()
    return {s.key: s for s in items}, end


def four(prefix="k") -> Archive:
    archive = Archive()
    for i in range(4):
        archive.sample(f"{prefix}{i}", IMAGE)
    return archive


def replace_header(archive: Archive, index: int, new: bytes) -> bytes:
    at = archive.data.index(archive.entries[index].headers)
    return archive.data[:at] + new + archive.data[at + 512:]


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- silent key loss: damage in the middle is recorded and read past -----------------------


def test_bad_checksum_skips_one_member_and_records_the_range(tmp_path):
    archive = four()
    at = archive.data.index(archive.entries[1].headers)
    data = bytearray(archive.data + END)
    data[at + 3] ^= 0x20
    samples, end = read(write(tmp_path, "c.tar", bytes(data)))
    assert {k for k, s in samples.items() if s.alive} == {"k0", "k2", "k3"}
    assert "no image member" in samples["k1"].reason  # its .txt/.json headers survived
    lost = at + 512 + len(pad(IMAGE))  # the header and the image's data
    assert end.skipped == ((at, lost),) and f"bytes {at}-{lost} skipped" in end.errors[0]


@pytest.mark.parametrize("size_change", [-600, +1500])
def test_wrong_size_field_rejects_that_member_only(tmp_path, size_change):
    archive = four()
    data = replace_header(archive, 1, header(b"k1.jpg", len(IMAGE) + size_change)) + END
    samples, end = read(write(tmp_path, "s.tar", data))
    assert {k for k, s in samples.items() if s.alive} == {"k0", "k2", "k3"}
    assert not samples["k1"].alive and "size field" in samples["k1"].reason
    assert all(samples[k].image_bytes == IMAGE for k in ("k0", "k2", "k3"))


@pytest.mark.parametrize("kind, what", [(b"1", "hard link"), (b"3", "character device"), (b"5", "directory")])
def test_member_typed_as_link_or_device_is_rejected_and_the_rest_read(tmp_path, kind, what):
    archive = four()
    samples, end = read(write(tmp_path, "l.tar", replace_header(archive, 2, header(b"k2.jpg", len(IMAGE), kind)) + END))
    assert {k for k, s in samples.items() if s.alive} == {"k0", "k1", "k3"}
    assert what in samples["k2"].reason and not end.errors


def test_zero_blocks_and_concatenated_archives_are_read_through(tmp_path):
    archive = four()
    at = archive.data.index(archive.entries[2].headers)
    data = archive.data[:at] + bytes(512) + archive.data[at:] + END + four("z").data + END
    samples, end = read(write(tmp_path, "z.tar", data))
    assert sorted(samples) == [f"{p}{i}" for p in "kz" for i in range(4)]
    assert all(s.alive for s in samples.values()) and not end.errors


def test_gzip_of_concatenated_archives(tmp_path):
    data = gz(four().data + END) + gz(four("z").data + END)
    samples, end = read(write(tmp_path, "z.tar.gz", data))
    assert len(samples) == 8 and all(s.alive for s in samples.values()) and not end.errors


def test_archive_cut_at_a_header_boundary_says_so(tmp_path):
    samples, end = read(write(tmp_path, "cut.tar", four().data))
    assert len(samples) == 4 and all(s.alive for s in samples.values())
    assert "no end-of-archive blocks" in end.errors[0]


def test_bytes_inserted_or_deleted_mid_archive_resynchronise(tmp_path):
    archive = four()
    at = archive.data.index(archive.entries[2].headers)
    inserted = archive.data[:at - 40] + b"\x07" * 100 + archive.data[at - 40:] + END
    deleted = archive.data[:at - 40] + archive.data[at - 20:] + END
    for data in (inserted, deleted):
        samples, _ = read(write(tmp_path, "m.tar", data))
        assert {k for k, s in samples.items() if s.alive} >= {"k0", "k2", "k3"}
        assert set(samples) == {"k0", "k1", "k2", "k3"}


def test_a_header_hidden_off_the_grid_is_found_across_zero_blocks_before_an_odd_end():
    """Found by fuzzing: bytes lost from the first member header's zero tail through the same
    place in the next member's long-name header leave the first header whole and the second
    off the block grid inside the first's data, followed by its one zero byte and the end
    blocks: three zero blocks, then a 1-byte tail. Only two were searched across, and the
    second member's key was lost."""
    first = long_name(b"a.jpg") + member(b"a.jpg", bytes(range(256)) * 2 + b"x" * 88)
    data = first + long_name(b"b.jpg") + member(b"b.jpg", b"\0") + END
    cut = 1024 + 265
    damaged = data[:cut] + data[cut + len(first) - 1025:]
    assert damaged[1024:1536] == data[1024:1536]  # the first member's header survived whole
    assert damaged.find(header(b"b.jpg", 1)) == 2049  # the second's, off the grid in the first's data
    tar = TarReader(io.BytesIO(damaged), lambda name, size: size)
    members = list(tar)
    assert [(m.name, m.offset, m.data_offset, m.data) for m in members] == [
        (b"a.jpg", 0, 1536, damaged[1536:2049]), (b"b.jpg", 2049, 2561, b"\0")]
    assert "a header starts at byte 2049" in members[0].problem
    assert not tar.damage and not tar.end_problem  # read back on the grid, the archive ends as it should


# --- crashes that used to escape the reader ---------------------------------------------


def test_non_utf8_names_in_every_header_kind_are_rejected_under_distinct_keys(tmp_path):
    data = (member(b"caf\xe9.jpg", IMAGE)
            + long_name(b"long\xff" + b"x" * 120 + b".jpg") + member(b"truncated-name.jpg", IMAGE)
            + pax({b"hdrcharset": b"BINARY", b"path": b"bin\xfe.jpg"}) + member(b"bin.jpg", IMAGE)
            + pax({b"hdrcharset": b"\xff\xfe"}) + member(b"charset.jpg", IMAGE)
            + member(b"good.jpg", IMAGE) + END)
    samples, end = read(write(tmp_path, "u.tar", data))
    assert samples["good"].alive and samples["charset"].alive and not end.errors
    hostile = {k: s for k, s in samples.items() if not s.alive}
    assert set(hostile) == {"caf\\xe9", "long\\xff" + "x" * 120, "bin\\xfe"}
    assert all("not valid UTF-8" in s.reason for s in hostile.values())


def test_control_character_keys_never_merge_with_a_valid_one(tmp_path):
    data = member(b"ctl\x01.jpg", IMAGE) + member(b"ctl\x02.jpg", IMAGE) + member(b"ctl?.jpg", IMAGE) + END
    samples, _ = read(write(tmp_path, "k.tar", data))
    assert samples["ctl?"].alive
    assert {k: s.alive for k, s in samples.items()} == {"ctl\\x01": False, "ctl\\x02": False, "ctl?": True}


def test_hostile_sidecars_are_ignored_with_a_flag(tmp_path):
    archive = Archive()
    archive.sample("deep", IMAGE, meta=b"[" * 100_000)
    archive.sample("digits", IMAGE, meta=b"1" * 4301)
    archive.sample("nan", IMAGE, meta=b'{"x": NaN, "y": 1e999}')
    archive.sample("surrogate", IMAGE, meta=b'{"url": "\\ud800", "\\udfff": ["\\udc80"]}')
    archive.sample("caption", IMAGE, alt=None, meta=b'{"caption": "cap\\ud83d"}')
    archive.sample("huge", IMAGE, meta=b'{"x": "' + b"y" * (2 << 20) + b'"}')
    samples, end = read(write(tmp_path, "j.tar", archive.data + END))
    assert all(s.alive for s in samples.values()) and not end.errors
    for key in ("deep", "digits", "nan", "huge"):
        assert "meta_error" in samples[key].meta
        assert any(f.startswith("read: json sidecar ignored") for f in samples[key].flags)
    assert samples["surrogate"].meta == {"url": "\ufffd", "\ufffd": ["\ufffd"]}
    assert samples["caption"].alt_text == "cap\ufffd"


def test_tarfile_crashers_are_members_with_reasons(tmp_path):
    data = (pax({b"GNU.sparse.map": b"x", b"GNU.sparse.size": b"10"}) + member(b"map.jpg", IMAGE)
            + pax({b"GNU.sparse.major": b"1", b"GNU.sparse.minor": b"0", b"GNU.sparse.name": b"one.jpg"})
            + member(b"GNUSparseFile.0/one.jpg", b"x\n" + IMAGE)
            + member(b"good.jpg", IMAGE)
            + header(b"sparse.jpg", 0, b"S", magic=GNU, extended=True))
    samples, end = read(write(tmp_path, "x.tar", data))
    assert samples["good"].alive
    assert all("sparse" in samples[k].reason for k in ("map", "one", "sparse"))
    assert "ends early" in end.errors[0]


def test_megabyte_of_pax_digits_is_read_in_linear_time(tmp_path):
    data = pax(b"1" * (1 << 20)) + member(b"p.jpg", IMAGE) + member(b"good.jpg", IMAGE) + END
    start = time.perf_counter()
    samples, _ = read(write(tmp_path, "p.tar", data))
    assert time.perf_counter() - start < 5  # tarfile on 3.11.7: about 17 minutes
    assert samples["good"].alive
    (lost,) = [s for s in samples.values() if not s.alive]
    assert lost.key == "p\\@0" and "extended header (x) is malformed" in lost.reason


def test_member_over_the_cap_is_rejected_unread(tmp_path):
    data = member(b"big.jpg", IMAGE) + member(b"small.jpg", jpeg(20, 20)) + END
    samples, _ = read(write(tmp_path, "b.tar", data), InputConfig(max_member_bytes=len(IMAGE) - 1))
    assert samples["small"].alive and not samples["big"].alive
    assert "--max-member-bytes" in samples["big"].reason and samples["big"].image_bytes == b""


# --- the whole run: every string written is valid UTF-8 ----------------------------------


def test_hostile_corpus_runs_to_the_end_and_writes_valid_utf8(tmp_path):
    hostile = Archive()
    hostile.sample("good", IMAGE, meta=b'{"url": "\\ud800", "caption": "\\udfff"}')
    hostile.add(member(b"caf\xe9.jpg", IMAGE) + member(b"ctl\x01.jpg", IMAGE) + member(b"ctl?.jpg", IMAGE))
    hostile.add(pax({b"hdrcharset": b"BINARY", b"path": b"bin\xfe.jpg"}) + member(b"bin.jpg", IMAGE))
    hostile.sample("nocaption", IMAGE, alt=None, meta=b'{"caption": "a\\udc80b"}')
    damaged = four()
    damaged_data = bytearray(damaged.data)
    damaged_data[damaged.data.index(damaged.entries[1].headers) + 5] ^= 1
    shards = [write(tmp_path, "hostile.tar", hostile.data + END), write(tmp_path, "damaged.tar", bytes(damaged_data))]
    out = tmp_path / "out"
    assert densefusion_local.main(["run", "--shards", *map(str, shards), "--out", str(out), "--no-progress",
                                   "--stages", "probe", "--min-short-edge", "0"]) == 0
    results = check_output_contract(out, shards)
    written, rejected = results["hostile"]
    assert {r["key"] for r in written} == {"good", "ctl?", "nocaption"}
    assert {r["key"] for r in rejected} == {"caf\\xe9", "ctl\\x01", "bin\\xfe"}
    assert written[0]["meta"]["url"] == "\ufffd"
    manifest = read_manifest(out)
    assert manifest["damaged"]["skipped"] and manifest["damaged"]["written"] == 3
    assert manifest["damaged"]["samples"] == manifest["damaged"]["written"] + manifest["damaged"]["rejected"]


# --- issue 21, item 3: data full of the magic is skipped, not searched byte by byte ----------

FILL = (2 << 20) + 300  # past two read chunks, off the block grid at its end


def near_header() -> bytes:
    """A header block with the magic whose checksum is wrong: every test but the last passes."""
    block = bytearray(header(b"near.jpg", 0))
    block[148:156] = b"000001\0 "
    return bytes(block)


HOSTILE = {  # data that holds the magic every few bytes and no valid header
    "ustar000": b"ustar000",
    "ustar0": b"ustar0",
    "digits": b"ustar" + b"0" * 19,  # the fields a header test reads first are digits
    "near headers on the grid": near_header(),
    "near headers off the grid": b"\x01" * 100 + near_header(),
}


def hostile(fill: str) -> bytes:
    unit = HOSTILE[fill]
    return (unit * (FILL // len(unit) + 1))[:FILL]


def placed(place: str, data: bytes) -> tuple[bytes, set[str]]:
    """The hostile data where a reader skips it, then a good sample; the keys to expect."""
    if place == "over-cap image":
        return member(b"big.jpg", data), {"big"}
    if place == "unused member":
        return member(b"big.bin", data), {"big"}
    if place == "txt past its kept start":
        return member(b"t.jpg", IMAGE) + member(b"t.txt", data), {"t"}
    if place == "extended header over its cap":
        return pax(data) + member(b"p.jpg", IMAGE), {"p\\@0"}
    assert place == "resync after a damaged header"
    return header(b"lost.jpg", len(data), bad_checksum=True) + pad(data), set()


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("fill", sorted(HOSTILE))
@pytest.mark.parametrize("place", ["over-cap image", "unused member", "txt past its kept start",
                                   "extended header over its cap", "resync after a damaged header"])
def test_hostile_data_is_skipped_by_its_size_field_and_what_follows_is_read(tmp_path, place, fill, gzipped):
    data = hostile(fill)
    before, keys = placed(place, data)
    tar = before + member(b"after.jpg", IMAGE) + END
    cfg = InputConfig(max_member_bytes=1 << 20)
    samples, end = read(write(tmp_path, "h.tar.gz" if gzipped else "h.tar", gz(tar) if gzipped else tar), cfg)
    assert set(samples) == keys | {"after"}  # nothing in the data was taken for a header
    assert samples["after"].alive and samples["after"].image_bytes == IMAGE
    if place == "over-cap image":
        assert "--max-member-bytes" in samples["big"].reason
    if place == "txt past its kept start":
        assert samples["t"].alive and samples["t"].alt_text
    if place == "extended header over its cap":
        assert "over the" in samples["p\\@0"].reason and samples["p\\@0"].image_bytes == b""
    if place == "resync after a damaged header":
        assert end.skipped == ((0, len(before)),) and end.unread_bytes == 0
    else:
        assert not end.errors
        kept = 4 * cfg.max_alt_text_chars + 1024 if place.startswith("txt") else 0
        unread = len(data) - kept + (len(IMAGE) if place.startswith("extended") else 0)  # p.jpg: unusable
        assert end.unread_bytes == unread  # said in the marker: passed over, not read


def test_a_header_hidden_off_the_grid_near_the_end_of_a_skipped_member_is_found():
    """A skipped member holds its last bytes: bytes lost inside it leave the next header off
    the grid before its claimed end, found when what follows turns out not to be a header."""
    data = member(b"big.bin", bytes(range(256)) * 9000) + member(b"next.jpg", IMAGE) + END
    lost = 512 + 2_000_000
    damaged = data[:lost] + data[lost + 100:]
    tar = TarReader(io.BytesIO(damaged), lambda name, size: 0)
    members = list(tar)
    at = damaged.find(header(b"next.jpg", len(IMAGE)))
    assert [(m.name, m.offset) for m in members] == [(b"big.bin", 0), (b"next.jpg", at)]
    assert f"a header starts at byte {at}" in members[0].problem


def test_a_lost_pax_block_between_a_keys_members_leaves_the_key_given_out_once(tmp_path):
    """Issue 21, item 5: an unusable PAX header in the middle of k's members splits them into
    runs; k used to be written and rejected ("no image member") both."""
    lost_at = len(member(b"k.jpg", IMAGE))
    data = (member(b"k.jpg", IMAGE) + pax(b"not records") + member(b"k.txt", b"alt")
            + member(b"k.json", b"{}") + member(b"j.jpg", IMAGE) + END)
    samples, end = read(write(tmp_path, "p.tar", data))
    assert set(samples) == {"k", f"k\\@{lost_at}", "k\\#2", "j"} and end.n_samples == 4
    assert samples["k"].alive and samples["j"].alive
    assert "extended header (x) is malformed" in samples[f"k\\@{lost_at}"].reason
    assert samples["k\\#2"].reason.startswith("duplicate key 'k'")
