"""A corpus of bad inputs: each is rejected with a reason, and no good sample is lost with it."""

from conftest import encode, jpeg, sample_members, write_tar
from contract import check_output_contract
from PIL import Image
from test_decode import bomb_png, exif_rotated_jpeg

import densefusion_local
from engine.io.manifest import read_manifest

GOOD = {
    "good-plain": jpeg(640, 480),
    "good-cmyk": encode(Image.new("CMYK", (600, 500), (0, 200, 200, 0)), "JPEG"),
    "good-16bit": encode(Image.new("I;16", (600, 500), 30000), "PNG"),
    "good-palette": encode(Image.new("P", (600, 500), 7), "PNG"),
    "good-alpha": encode(Image.new("RGBA", (600, 500), (0, 0, 255, 100)), "PNG"),
    "good-animated": encode(Image.new("RGB", (600, 500)), "GIF", save_all=True, append_images=[Image.new("RGB", (600, 500), 9)]),
    "good-exif": exif_rotated_jpeg(900, 500, 6),
}


def test_bad_input_corpus(tmp_path, capsys):
    truncated = jpeg(800, 600, quality=95)
    members = []
    for key, data in GOOD.items():
        members += sample_members(key, data, ext="png" if data[:4] == b"\x89PNG" else "jpg")
    members += sample_members("bad-zero", b"")
    members += sample_members("bad-truncated", truncated[: len(truncated) // 2])
    members += sample_members("bad-html", b"<!doctype html><p>404</p>")
    members += sample_members("bad-bomb", bomb_png(60_000, 60_000), ext="png")
    members += sample_members("bad-corrupt", jpeg(800, 600)[:200] + bytes(range(256)) * 20)
    members += [("../escape.jpg", jpeg(600, 600)), ("/abs/path.jpg", jpeg(600, 600))]
    members += sample_members("good-plain", jpeg(700, 700), "duplicate key")
    members += [("good-hugealt.jpg", jpeg(600, 600)), ("good-hugealt.txt", b"\xff\xfe" + b"word " * 200_000),
                ("good-hugealt.json", b"{not json")]
    members += sample_members("small", jpeg(300, 200))
    shard = write_tar(tmp_path / "bad.tar", members)
    truncated_tar = write_tar(tmp_path / "cut.tar", sum((sample_members(f"c{i}", jpeg(500, 500)) for i in range(5)), []))
    truncated_tar.write_bytes(truncated_tar.read_bytes()[:-3000])

    assert densefusion_local.main(["run", "--shards", str(shard), str(truncated_tar), "--out",
                                   str(tmp_path / "out"), "--no-progress", "--stages", "decode"]) == 0
    results = check_output_contract(tmp_path / "out", [shard])
    written, rejected = results["bad"]
    assert {r["key"] for r in written} == set(GOOD) | {"good-hugealt"}
    reasons = {r["key"]: (r["stage"], r["status"], r["reason"]) for r in rejected}
    assert reasons["small"][:2] == ("probe", "filtered")
    assert "zero-byte" in reasons["bad-zero"][2]
    assert "truncated" in reasons["bad-truncated"][2]
    assert "not an image" in reasons["bad-html"][2]
    assert "bomb" in reasons["bad-bomb"][2]
    assert reasons["bad-corrupt"][0] in ("probe", "decode")
    assert any("escapes" in r[2] for r in reasons.values())
    assert any("absolute" in r[2] for r in reasons.values())
    assert reasons["good-plain\\#2"][2].startswith("duplicate key")
    by_key = {r["key"]: r for r in written}
    assert (by_key["good-exif"]["width"], by_key["good-exif"]["height"]) == (500, 900)
    assert len(by_key["good-hugealt"]["alt_text"]) == 2000
    assert by_key["good-hugealt"]["meta"]["meta_error"]

    cut = read_manifest(tmp_path / "out")["cut"]
    assert cut["written"] >= 3 and "ends early" in cut["errors"][0]
    assert "done in" in capsys.readouterr().out
