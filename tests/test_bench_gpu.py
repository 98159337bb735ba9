"""``python -m bench gpu --tiny``: the GPU benchmark's code on tiny models on the CPU, with the
libraries a GPU measuring machine lacks made unimportable, so the command cannot rot."""

import json
import sys

import pytest

from bench import gpu

ABSENT_ON_THE_GPU_MACHINE = ("open_clip", "timm", "sglang", "tensorrt", "nvidia.dali", "faiss", "pynvml")


def test_tiny_run_writes_every_row_without_the_absent_libraries(tmp_path, monkeypatch, capsys):
    for name in ABSENT_ON_THE_GPU_MACHINE:
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as on that machine
    out = tmp_path / "gpu.json"
    assert gpu.main(["--tiny", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    labels = [r["row"] for r in figures["rows"]]
    for prefix in ("embed: tiny CLIP ViT, incl. decode", "tag: RAM++", "detect: OWLv2", "detect: closed-set",
                   "ocr: PP-OCR batched", "curate: k-means 20 + SemDeDup",
                   "caption: 2 per call, arrival order", "caption: naive generate, batch 4, beam 3"):
        assert any(label.startswith(prefix) for label in labels), (prefix, labels)
    modes = [r["row"] for r in figures["rows"] if r["row"].startswith("caption:") and "sorted" in r["row"]]
    assert [m.rsplit(" ", 1)[1] for m in modes] == ["dynamic", "static"]
    # a row per engine family besides LLaVA-1.6, at its tiny build's image budget (its processor's)
    families = {r["family"]: r for r in figures["rows"] if r["row"].startswith("caption family")}
    assert {"Qwen2.5-VL": 64, "Qwen3-VL": 64, "InternVL": 82} == {f: r["max_image_tokens"] for f, r in families.items()}
    assert all(r["images_per_s"] > 0 and f"<={r['max_image_tokens']} image tokens" in r["row"] for r in families.values())
    caption = [r for r in figures["rows"] if r["row"].startswith("caption:")]
    best = max(caption[:-1], key=lambda r: r["images_per_s"])
    assert figures["caption_best_images_per_s"] == best["images_per_s"]
    assert figures["caption_vs_naive"] == pytest.approx(best["images_per_s"] / caption[-1]["images_per_s"])
    # the experts' share is their time per image over the caption engine's
    assert figures["experts_share_of_caption"] == pytest.approx(figures["experts_ms_per_image"] / best["ms_per_image"])
    assert all(r["peak_gpu_gib"] is None and r["gpu_utilisation"] is None for r in figures["rows"] if r.get("images"))
    text = capsys.readouterr().out
    assert "of the caption engine's time per image" in text and "naive generate loop" in text


def test_without_onnxruntime_the_ocr_row_says_it_was_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    row = gpu.ocr_row(1, "cpu")
    assert row["images"] == 0 and row["row"].startswith("ocr: skipped")


def test_real_sizes_need_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU; --tiny"):
        gpu.main([])
