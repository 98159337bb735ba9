import struct
import zlib

import numpy as np
import pytest
from conftest import encode, jpeg
from PIL import Image

from engine.core.config import DecodeConfig, FilterConfig
from engine.core.record import Sample, Source
from engine.core.stage import ImageView
from engine.image.decode import decode_views
from engine.image.probe import probe_header
from engine.stages.decode import Decode
from engine.stages.probe import ResolutionFilter

VIEWS = (ImageView("big", 4096), ImageView("small", 100))


def sample_of(data: bytes, key="k") -> Sample:
    return Sample(key=key, source=Source("s", "s.tar", f"{key}.jpg"), image_bytes=data)


def exif_rotated_jpeg(width: int, height: int, orientation: int) -> bytes:
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, width // 2, height))  # left half white
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes())


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing a huge image, with almost no data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_probe_reads_size_from_header_and_applies_exif_orientation():
    header = probe_header(exif_rotated_jpeg(800, 500, orientation=6))
    assert (header.width, header.height, header.format) == (500, 800, "JPEG")


def test_decode_applies_exif_orientation():
    views = decode_views(exif_rotated_jpeg(800, 500, orientation=6), VIEWS, 10**9)
    big = views["big"]
    assert big.shape == (800, 500, 3)
    # orientation 6 = rotate 90° clockwise for display: the white left half ends on top
    assert big[:200].mean() > 200 and big[-200:].mean() < 50


@pytest.mark.parametrize("make", [
    lambda: encode(Image.new("CMYK", (600, 500), (0, 255, 255, 0)), "JPEG"),
    lambda: encode(Image.new("P", (600, 500), 3), "PNG"),
    lambda: encode(Image.new("RGBA", (600, 500), (255, 0, 0, 0)), "PNG"),
    lambda: encode(Image.new("LA", (600, 500), (10, 128)), "PNG"),
    lambda: encode(Image.new("L", (600, 500), 90), "WEBP"),
    lambda: encode(Image.new("RGB", (600, 500), (1, 2, 3)), "GIF", save_all=True,
                   append_images=[Image.new("RGB", (600, 500), (200, 0, 0))]),
], ids=["cmyk", "palette", "rgba", "la", "webp-gray", "animated-gif"])
def test_every_mode_becomes_rgb_uint8(make):
    views = decode_views(make(), VIEWS, 10**9)
    assert views["big"].shape == (500, 600, 3) and views["big"].dtype == np.uint8
    assert views["small"].shape == (83, 100, 3)


def test_sixteen_bit_is_scaled_not_clipped():
    array = np.full((500, 600), 32768, dtype=np.uint16)
    data = encode(Image.fromarray(array), "PNG")
    assert Image.open(__import__("io").BytesIO(data)).mode.startswith("I")
    pixel = decode_views(data, VIEWS, 10**9)["big"][0, 0]
    assert 120 <= pixel[0] <= 136


def test_transparent_pixels_are_composited_on_white():
    pixel = decode_views(encode(Image.new("RGBA", (600, 500), (255, 0, 0, 0)), "PNG"), VIEWS, 10**9)["big"][0, 0]
    assert tuple(pixel) == (255, 255, 255)


def test_jpeg_draft_decodes_small_views_without_losing_the_aspect():
    views = decode_views(jpeg(1600, 1200), (ImageView("thumb", 200),), 10**9)
    assert views["thumb"].shape == (150, 200, 3)


def test_views_never_upscale():
    assert decode_views(jpeg(500, 400), (ImageView("huge", 2000),), 10**9)["huge"].shape == (400, 500, 3)


def test_resolution_filter_and_bomb_guard():
    stage = ResolutionFilter(FilterConfig(min_short_edge=448, max_pixels=50_000_000))
    small, ok, bomb, junk, empty = (sample_of(jpeg(800, 300)), sample_of(jpeg(800, 448)),
                                    sample_of(bomb_png(100_000, 100_000)), sample_of(b"<html>"), sample_of(b""))
    stage.process([small, ok, bomb, junk, empty])
    assert (small.status, ok.status) == ("filtered", "ok")
    assert "short edge 300" in small.reason
    assert (ok.width, ok.height) == (800, 448)
    assert bomb.status == "error" and "bomb" in bomb.reason
    assert junk.status == "error" and "not an image" in junk.reason
    assert empty.status == "error" and "zero-byte" in empty.reason


def test_decode_stage_records_corrupt_images_and_keeps_good_ones():
    data = jpeg(800, 600)
    stage = Decode(DecodeConfig(decode_threads=2), FilterConfig(), (ImageView("v", 256),))
    stage.setup()
    good, truncated = sample_of(data, "good"), sample_of(data[: len(data) // 3], "bad")
    stage.process([good, truncated])
    stage.teardown()
    assert good.alive and good.views["v"].shape == (192, 256, 3)
    assert truncated.status == "error" and "truncated" in truncated.reason and not truncated.views


def test_decode_without_consumers_still_verifies_pixels():
    data = jpeg(800, 600)
    stage = Decode(DecodeConfig(), FilterConfig(), ())
    stage.setup()
    good, truncated = sample_of(data), sample_of(data[:700])
    stage.process([good, truncated])
    assert good.alive and good.views == {}
    assert not truncated.alive


@pytest.mark.parametrize("decoder, package", [("torchvision", "torchvision"), ("dali", "nvidia.dali")])
def test_batch_decoders_match_pil_and_fall_back_for_other_formats(decoder, package):
    pytest.importorskip(package)
    rng = np.random.default_rng(0)
    rotated = exif_rotated_jpeg(900, 500, 6)
    smooth = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((1280, 960), Image.Resampling.BICUBIC)
    photo = encode(smooth, "JPEG")
    cmyk = encode(Image.new("CMYK", (600, 500), (0, 255, 255, 0)), "JPEG")
    png = encode(Image.new("RGB", (600, 500), (5, 6, 7)), "PNG")
    views = (ImageView("v", 320),)
    samples = [sample_of(photo, "a"), sample_of(cmyk, "b"), sample_of(png, "c"), sample_of(rotated, "d")]
    ResolutionFilter(FilterConfig(min_short_edge=0)).process(samples)
    stage = Decode(DecodeConfig(decoder=decoder), FilterConfig(), views, device="cpu")
    stage.setup()
    stage.process(samples)
    reference = decode_views(photo, views, 10**9)["v"]
    assert all(s.alive for s in samples)
    assert samples[0].views["v"].shape == reference.shape == (240, 320, 3)
    assert np.abs(samples[0].views["v"].astype(int) - reference.astype(int)).mean() < 4
    assert samples[1].views["v"].shape == (267, 320, 3) and samples[2].views["v"][0, 0].tolist() == [5, 6, 7]
    rotated_view = samples[3].views["v"]  # EXIF orientation applied by the batch decoder too
    assert rotated_view.shape == (320, 178, 3) and rotated_view[:100].mean() > 200 and rotated_view[-100:].mean() < 50
