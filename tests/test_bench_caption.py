"""The caption benchmark runs end to end on the tiny model (figures are printed, not asserted)."""

import pytest

from bench import caption


def test_bench_caption_prints_before_and_after_rows(capsys, tmp_path):
    argv = ["--images", "4", "--batch", "2", "--window", "2", "--tokens", "3", "--decode", "dynamic", "static",
            "--cache-dir", str(tmp_path)]
    assert caption.main(argv) == 0
    out = capsys.readouterr().out
    for row in ("1 per call, dynamic", "2 per call, arrival order, dynamic",
                "2 per call, window of 2 sorted, dynamic", "2 per call, window of 2 sorted, static"):
        assert row in out
    assert "images/s" in out and "padding" in out


def test_real_size_refuses_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        caption.real_size_engine(8)


def test_real_size_config_is_llava_1_6_7b():
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from models.tiny import LLAVA_NEXT_7B, llava_next_parts

    config, _ = llava_next_parts(LLAVA_NEXT_7B)
    with torch.device("meta"):  # shapes only, nothing allocated
        net = LlavaNextForConditionalGeneration(config)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(7.06e9, rel=0.005)
