import sys
import types

from models.caption.figures import CaptionTally, GpuSampler, gpu_figures
from models.records import Caption


def _caption(prompt: int, output: int, finish: str = "stop") -> Caption:
    return Caption("x", prompt, output, finish, 0.0, "m", "openai")


def test_tally_reports_token_and_image_rates():
    tally = CaptionTally()
    tally.add([_caption(3000, 250), _caption(3100, 200, "length")], seconds=2.0)
    tally.add([_caption(0, 0, "error")], seconds=1.0)
    figures = tally.figures()
    assert figures["images_per_s"] == 1.0
    assert figures["prompt_tokens_per_s"] == 6100 / 3
    assert figures["output_tokens_per_s"] == 450 / 3
    assert (figures["finish_stop"], figures["finish_length"], figures["finish_error"]) == (1, 1, 1)
    assert CaptionTally().figures() == {}


def test_gpu_figures_read_nvml_when_present(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert gpu_figures() == {}

    class NVMLError(Exception):
        pass

    calls = []
    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50 + h),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu_figures() == {"gpu0_memory_used_gib": 1.0, "gpu0_util_percent": 50.0,
                             "gpu1_memory_used_gib": 2.0, "gpu1_util_percent": 51.0}
    assert calls == ["init", "shutdown"]

    def no_driver():
        raise NVMLError("driver not loaded")

    monkeypatch.setattr(fake, "nvmlInit", no_driver)
    assert gpu_figures() == {}


def test_gpu_sampler_keeps_peak_memory_and_mean_utilisation(monkeypatch):
    reads = iter([{"gpu0_memory_used_gib": 3.0, "gpu0_util_percent": 80.0},
                  {"gpu0_memory_used_gib": 5.0, "gpu0_util_percent": 100.0},
                  {"gpu0_memory_used_gib": 4.0, "gpu0_util_percent": 60.0}])
    monkeypatch.setattr("models.caption.figures.gpu_figures", lambda: next(reads))
    sampler = GpuSampler(every_s=0.0)
    for _ in range(3):
        sampler.maybe_sample()
    assert sampler.figures() == {"gpu0_memory_peak_gib": 5.0, "gpu0_mean_util_percent": 80.0}
    throttled = GpuSampler(every_s=3600.0)
    monkeypatch.setattr("models.caption.figures.gpu_figures", lambda: {"gpu0_util_percent": 1.0})
    throttled.maybe_sample()
    throttled.maybe_sample()  # within every_s: not read again
    assert throttled.figures() == {"gpu0_mean_util_percent": 1.0}
    assert GpuSampler().figures() == {}


class _SglangLike:
    backend = "sglang"

    def metrics(self):
        return {"prompt_tokens": 6100.0, "cached_tokens": 1525.0, "prefix_cache_hit_rate": 0.25}


def test_caption_stage_shows_tokens_cache_hits_and_gpu_live(monkeypatch):
    from engine.core.config import CaptionConfig, RuntimeConfig
    from engine.stages.caption import CaptionStage

    stage = CaptionStage(CaptionConfig(), RuntimeConfig(out="unused", models="tiny", device="cpu"))
    assert stage.progress() == {}  # nothing generated yet
    stage.engine = _SglangLike()
    stage.tally.add([_caption(3000, 250), _caption(3100, 200)], seconds=2.0)
    monkeypatch.setattr("models.caption.figures.gpu_figures",
                        lambda: {"gpu0_memory_used_gib": 61.5, "gpu0_util_percent": 97.0})
    stage.gpu.maybe_sample()
    assert stage.progress() == {"prompt tok/s": "3050", "out tok/s": "225", "prefix hit": "25%",
                                "gpu": "61.5 GiB, 97%"}


def test_progress_bar_carries_the_stages_live_figures(capsys):
    from engine.core.console import ProgressBar
    from engine.core.stage import Stage

    class Live(Stage):
        def progress(self):
            return {"out tok/s": "225"}

    bar = ProgressBar(True, [Stage(), Live()])
    bar.update(16, 1)
    bar.close()
    err = capsys.readouterr().err
    assert "16img" in err and "rejected=1" in err and "out tok/s=225" in err
