"""Execution providers for the exported experts: TensorRT, then CUDA, then the CPU."""

import pytest

from models.errors import ConfigError
from models.onnx_session import open_session, providers

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def available(monkeypatch):
    import onnxruntime as ort

    def have(names):
        monkeypatch.setattr(ort, "get_available_providers", lambda: names)

    return have


def test_cpu_runs_on_the_cpu_whatever_is_installed(available, tmp_path):
    available(ALL)
    assert providers("cpu", tmp_path / "m.onnx") == ["CPUExecutionProvider"]


def test_a_gpu_prefers_tensorrt_with_fp16_and_an_engine_cache_beside_the_model(available, tmp_path):
    available(ALL)
    chosen = providers("cuda:1", tmp_path / "m.onnx")
    assert [p if isinstance(p, str) else p[0] for p in chosen] == ALL
    trt, cuda = chosen[0][1], chosen[1][1]
    assert trt == {"device_id": 1, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                   "trt_engine_cache_path": str(tmp_path / "tensorrt")}
    assert cuda == {"device_id": 1}


def test_a_read_only_model_folder_builds_engines_without_caching_them(available, tmp_path, monkeypatch):
    import os

    available(ALL)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a read-only folder
    trt = providers("cuda", tmp_path / "m.onnx")[0][1]
    assert trt["trt_engine_cache_enable"] is False and "trt_engine_cache_path" not in trt


def test_without_gpu_providers_a_gpu_request_runs_on_the_cpu(available, tmp_path):
    available(["CPUExecutionProvider"])
    assert providers("cuda", tmp_path / "m.onnx") == ["CPUExecutionProvider"]
    available(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers("cuda", tmp_path / "m.onnx") == [("CUDAExecutionProvider", {"device_id": 0}),
                                                      "CPUExecutionProvider"]


def test_a_missing_file_is_a_config_error_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match="--closed-detector .* does not exist"):
        open_session(tmp_path / "missing.onnx", "cpu", flag="--closed-detector")
