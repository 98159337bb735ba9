"""The capacity plan (``densefusion_local.py plan``): the README's real models on 8 GPUs of 40 and
80 GB, from architectures built on the meta device (no GPU, no weights), and refusals."""

import re

import pytest
import torch

import densefusion_local
from engine.core import config
from engine.core.placement import GIB, make_plan
from models.errors import ConfigError

README_MODELS = {  # the "Real checkpoints on a GPU node" command of the README
    "curate": {"embed_model": "EVA02-L-14"},
    "experts": {"ram_plus_model": "/ckpt/ram_plus/ram_plus_swin_large_14m.pth",
                "owlv2_model": "google/owlv2-base-patch16-ensemble", "closed_detector": "/ckpt/eva02_lvis.onnx"},
    "caption": {"caption_model": "llava-hf/llava-v1.6-vicuna-7b-hf", "caption_backend": "auto"},
}
ALL_STAGES = ["probe", "decode", "category", "tag", "detect", "ocr", "prompt", "caption", "qc", "score"]
EXPERTS = {"category", "tag", "detect", "ocr"}  # the stages that declare replicate and memory


@pytest.fixture(scope="module")
def readme_cfg(tmp_path_factory):
    return config.build(runtime={"out": str(tmp_path_factory.mktemp("out"))}, **README_MODELS)


@pytest.mark.parametrize("gib", [40, 80])
def test_readme_models_fit_8_gpus_with_experts_and_a_caption_replica_each(readme_cfg, gib):
    plan = make_plan(readme_cfg, ALL_STAGES, 8, gib * GIB)
    assert plan.fits, plan.problems
    assert len(plan.budgets) == 8
    for budget in plan.budgets:
        assert {n.stage for n in budget.experts} >= EXPERTS  # every expert on every GPU
        assert budget.caption_bytes >= plan.caption.min_bytes  # and room for a caption replica
    assert set(plan.replicated) == EXPERTS
    # SGLang's static share holds its weights and KV cache, and leaves the experts' budget
    tightest = max(plan.budgets, key=lambda b: b.experts_bytes)
    sglang_bytes = plan.sglang_mem_fraction * plan.gpu_bytes
    assert sglang_bytes >= plan.caption.min_bytes
    assert plan.gpu_bytes - sglang_bytes >= tightest.experts_bytes + tightest.overhead + tightest.margin
    # parameter counts are the architectures' own (built on the meta device)
    counts = {n.model: n.params for n in tightest.experts}
    assert counts["EVA02-L-14 (open_clip)"] == pytest.approx(428e6, rel=0.01)
    assert plan.caption.params == pytest.approx(7.06e9, rel=0.005)


def test_more_memory_leaves_sglang_a_larger_share(readme_cfg):
    small, large = (make_plan(readme_cfg, ALL_STAGES, 8, g * GIB) for g in (40, 80))
    assert large.sglang_mem_fraction > small.sglang_mem_fraction
    assert large.budgets[0].experts_bytes == small.budgets[0].experts_bytes


def test_plan_command_prints_the_budget_and_refuses_what_cannot_fit(capsys):
    flags = ["--ram-plus-model", "/ckpt/ram_plus/ram_plus_swin_large_14m.pth",
             "--closed-detector", "/ckpt/eva02_lvis.onnx"]
    assert densefusion_local.main(["plan", "--gpus", "8", "--gpu-memory-gb", "80", *flags]) == 0
    out = capsys.readouterr().out
    assert "fits." in out and "--sglang-mem-fraction 0." in out and "(estimate)" in out
    assert densefusion_local.main(["plan", "--gpus", "2", "--gpu-memory-gb", "16", *flags]) == 2
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "cuda:0: the caption engine needs" in out and "cuda:1: the caption" in out


def test_a_run_that_cannot_fit_is_refused_before_any_work(tmp_path, monkeypatch):
    from engine.core import pipeline
    from engine.io.demo_data import write_demo_shards

    class Props:
        total_memory = 12 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    shards = write_demo_shards(tmp_path / "in", n_shards=1)
    cfg = config.build(input={"shards": tuple(map(str, shards))},
                       runtime={"out": str(tmp_path / "out"), "device": "cuda", "progress": False}, **README_MODELS)
    with pytest.raises(ConfigError, match="do not fit this node's GPUs: cuda:0: .*; cuda:1: "):
        pipeline.run(cfg)
    assert not (tmp_path / "out").exists()


LOCAL_EXPERTS = ["--ram-plus-model", "/ckpt/ram_plus/ram_plus_swin_large_14m.pth", "--closed-detector", "/ckpt/eva02_lvis.onnx"]


def plan_output(capsys, *flags, experts=LOCAL_EXPERTS) -> tuple[int, str]:
    code = densefusion_local.main(["plan", *experts, *flags])
    return code, capsys.readouterr().out


def test_tensor_parallel_splits_the_caption_engine_and_a_plan_that_does_not_fit_says_what_would(capsys):
    code, alone = plan_output(capsys, "--gpus", "8", "--gpu-memory-gb", "24")
    assert code == 2 and "DOES NOT FIT" in alone
    suggestions = alone[alone.index("to make room:"):]
    assert "--sglang-tp-size 2: each caption replica spans 2 GPUs" in suggestions and "enough on its own" in suggestions
    assert suggestions.count("enough on its own") == 1  # leaving out every expert would not do
    assert "fewer experts per GPU: --closed-detector '' (frees 1.7 GiB" in suggestions  # the largest first
    code, split = plan_output(capsys, "--gpus", "8", "--gpu-memory-gb", "24", "--sglang-tp-size", "2")
    assert code == 0 and split.endswith("fits.\n"), split
    assert "a 1/2 share of a caption replica" in split and "tensor parallel over 2 GPUs (4 replica(s))" in split
    weights = re.search(r"weights (\d+\.\d) GiB and KV cache", split).group(1)
    assert float(weights) == pytest.approx(13.2 / 2, abs=0.1)  # half the 7B engine's weights on each GPU
    code, odd = plan_output(capsys, "--gpus", "3", "--gpu-memory-gb", "80", "--sglang-tp-size", "2")
    assert code == 2 and "the node needs a multiple of 2 GPUs, not 3" in odd


def test_transformers_backend_is_labelled_as_such_and_fewer_requests_are_suggested(capsys):
    code, text = plan_output(capsys, "--gpus", "2", "--gpu-memory-gb", "24", "--caption-backend", "transformers", experts=[])
    assert code == 2
    assert "(transformers)" in text and "(sglang)" not in text and "SGLang runtime" not in text
    assert "--caption-batch 2: KV cache for 2 requests at once instead of 8" in text
    assert "--caption-backend sglang --sglang-tp-size 2" in text  # tensor parallel is SGLang's


def test_the_plans_random_builds_do_not_warn_but_other_weightless_builds_still_do(caplog, capsys):
    import open_clip

    from engine.stages.embed import embedder_need

    embedder_need.cache_clear()  # the plan builds the embedder on the meta device (random on purpose) again
    with caplog.at_level("WARNING"):
        assert densefusion_local.main(["plan", *LOCAL_EXPERTS]) == 0
    assert "fits." in capsys.readouterr().out
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    with caplog.at_level("WARNING"), torch.device("meta"):
        open_clip.create_model("EVA02-L-14", pretrained=None, device="meta")
    assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
