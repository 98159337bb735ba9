"""The caption benchmark runs end to end on the tiny model (figures are printed, not asserted)."""

import pytest

from bench import caption


def test_bench_caption_prints_figures(capsys, tmp_path):
    assert caption.main(["--images", "2", "--batch", "2", "--tokens", "3", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "batch   1:" in out and "batch   2:" in out and "output tokens/s" in out


def test_real_size_refuses_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        caption.real_size_engine()


def test_real_size_config_is_llava_1_6_7b():
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from models.tiny import LLAVA_NEXT_7B, llava_next_parts

    config, _ = llava_next_parts(LLAVA_NEXT_7B)
    with torch.device("meta"):  # shapes only, nothing allocated
        net = LlavaNextForConditionalGeneration(config)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(7.06e9, rel=0.005)
