"""What SGLang needs to run on a machine without a GPU driver (CI, and users checking a setup).

sglang 0.5.23 serves on the CPU (``device="cpu"``), but two things stand in the way on a
machine with no NVIDIA driver, and this module is the one place that handles them:

* the ``sgl_kernel`` wheel's extension libraries link ``libcuda.so.1``, so ``import sglang``
  fails without a driver. :func:`build_stub` compiles, with gcc, a stand-in ``libcuda.so.1``
  whose functions (the driver symbols those libraries link against) all return
  ``CUDA_ERROR_NO_DEVICE``; none of them is called on the CPU path, and torch, asking it for
  devices, sees none.
* SGLang picks its CPU platform from ``SGLANG_USE_CPU_ENGINE=1``, read when ``sglang.srt`` is
  first imported, so it must be set before then.
* SGLang's Qwen-VL image processors import a module that binds four ``sgl_kernel`` CPU ops the
  CUDA build lacks, so without them no Qwen-VL checkpoint is served. ``sglang_cpu_site/
  sitecustomize.py`` declares them as placeholders (Qwen2.5-VL and Qwen3-VL never call them) in
  this process and, from ``PYTHONPATH``, in every interpreter SGLang starts, each time when
  ``sglang`` is first imported (other interpreters with that environment import nothing for it).

:func:`prepare` does all three, in this process and for the engine's child processes (which
inherit the environment). Where a real driver loads, neither the stub nor the placeholder ops are
used: the GPU path never loads them.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from models.errors import ConfigError

CUDA_ERROR_NO_DEVICE = 100
# Driver functions the sgl_kernel 0.4.10 extension libraries import (nm -D --undefined-only),
# then the entry points a CUDA runtime asks a driver for first.
DRIVER_SYMBOLS = (
    "cuCtxFromGreenCtx", "cuCtxPopCurrent_v2", "cuCtxPushCurrent_v2", "cuDevResourceGenerateDesc",
    "cuDevSmResourceSplitByCount", "cuDeviceGetDevResource", "cuDriverGetVersion", "cuGetErrorString",
    "cuGetProcAddress_v2", "cuGreenCtxCreate", "cuGreenCtxDestroy", "cuGreenCtxGetDevResource",
    "cuPointerGetAttribute", "cuStreamCreate", "cuInit", "cuDeviceGetCount", "cuGetProcAddress",
)
STUB_NAME = "libcuda.so.1"


def stub_source() -> str:
    """C source of the stand-in driver: every function fails with CUDA_ERROR_NO_DEVICE."""
    lines = ["/* Stand-in libcuda.so.1 for machines without an NVIDIA driver (densefusion). */"]
    lines += [f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}" for name in DRIVER_SYMBOLS]
    return "\n".join(lines) + "\n"


def driver_installed() -> bool:
    """Whether a real NVIDIA driver is installed (the loader's cache knows ``libcuda``). Not
    "does libcuda.so.1 load": a stand-in already loaded in this process would answer yes."""
    import ctypes.util

    return ctypes.util.find_library("cuda") is not None


def build_stub(folder: Path) -> Path:
    """``folder/libcuda.so.1``, compiled on first use (written under a temporary name, renamed)."""
    folder = Path(folder)
    target = folder / STUB_NAME
    if target.is_file():
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ConfigError(
            "SGLang on the CPU needs a C compiler to build a stand-in libcuda.so.1 (this machine "
            "has no NVIDIA driver): install gcc (apt-get install gcc), or use --caption-backend "
            "transformers"
        )
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        source = Path(scratch) / "libcuda_stub.c"
        source.write_text(stub_source())
        built = Path(scratch) / STUB_NAME
        result = subprocess.run(
            [gcc, "-shared", "-fPIC", "-O1", f"-Wl,-soname,{STUB_NAME}", "-o", str(built), str(source)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise ConfigError(f"building the stand-in {STUB_NAME} with gcc failed: {result.stderr.strip()}")
        built.replace(target)
    return target


def prepare(cache_dir: Path) -> Path | None:
    """Make ``import sglang`` and ``sglang.Engine(device="cpu")`` work here and in the engine's
    children; returns the stub it loaded, or None where a driver loads. Call it before anything
    imports ``sglang.srt``."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1" and any(m.startswith("sglang.srt") for m in sys.modules):
        # SGLang caches its platform choice on first use: too late to ask for the CPU one now
        raise ConfigError("sglang was imported before its CPU engine was asked for: set "
                          "SGLANG_USE_CPU_ENGINE=1 before importing sglang")
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    if driver_installed():
        return None
    stub = build_stub(Path(cache_dir) / "sglang-cpu")
    # Loaded by soname, so sgl_kernel's libraries find it in this process; children read the path.
    ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
    paths = [str(stub.parent), *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep))]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(paths))
    add_placeholder_ops()  # after the stub: declaring them first imports sgl_kernel
    return stub


SITE = Path(__file__).with_name("sglang_cpu_site")  # holds the placeholder ops' sitecustomize.py


def add_placeholder_ops() -> None:
    """The placeholder ``sgl_kernel`` CPU ops, declared here and in every interpreter started
    with this environment (``SITE`` first on ``PYTHONPATH``) that imports ``sglang``."""
    import importlib.util

    paths = [str(SITE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    spec = importlib.util.spec_from_file_location("densefusion_sglang_cpu_site", SITE / "sitecustomize.py")
    site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(site)  # declares them here on sglang's import, or now if it is imported already
