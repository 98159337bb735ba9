"""Placeholder ``sgl_kernel`` CPU ops for SGLang's CPU engine, registered at interpreter start.

sglang 0.5.23's Qwen-VL image processors (``multimodal/processors/qwen_vl.py``) import
``models/qwen3_5.py``, which binds four ``torch.ops.sgl_kernel.*_cpu`` kernels when it is
imported. The CUDA build of ``sgl_kernel`` has none of them, so the import fails and SGLang's
registry silently lacks every Qwen-VL processor ("No processor registered for architecture").
Qwen2.5-VL never calls them: declaring them (a call raises) is enough. SGLang starts its
scheduler and detokenizer as new interpreters, so this runs in each of them, from
``PYTHONPATH``, which ``models/caption/sglang_cpu.py`` sets for the CPU engine only; it is a
separate file because it must import nothing of the project.

Every other interpreter started with that environment (a test's child, a tool) pays nothing: the
ops are declared when ``sglang`` is first imported (a finder on ``sys.meta_path`` that steps
aside after that), not at interpreter start, so torch is not imported where SGLang never is.
"""

import os
import sys

PLACEHOLDER_OPS = ("fused_sigmoid_mul_cpu", "fused_qk_gemma_rmsnorm_cpu", "fused_qk_gemma_rmsnorm_with_gate_cpu",
                   "fused_qkvzba_split_reshape_cat_contiguous_cpu")
_LIBRARY = []  # the torch.library.Library must live as long as the process


def _unavailable(*args, **kwargs):
    raise NotImplementedError("a placeholder sgl_kernel CPU op was called: this SGLang build has no CPU kernel "
                              "for it (models/caption/sglang_cpu_site/sitecustomize.py)")


def register_placeholder_ops() -> None:
    import torch

    try:
        import sgl_kernel  # noqa: F401 - its own ops first: a build that has these keeps its kernels
    except Exception:  # noqa: BLE001 - sglang reports its own import failure where it matters
        pass
    library = torch.library.Library("sgl_kernel", "FRAGMENT")
    for name in PLACEHOLDER_OPS:
        try:
            getattr(torch.ops.sgl_kernel, name)
            continue  # a real kernel (or an earlier registration): keep it
        except (AttributeError, RuntimeError):
            pass
        library.define(f"{name}(Tensor[] tensors) -> Tensor")
        library.impl(name, _unavailable, "CompositeExplicitAutograd")
    _LIBRARY.append(library)


class _DeclareOnSglangImport:
    """A meta path finder that declares the ops when ``sglang`` is first looked for, then leaves
    the finding to the others (it finds nothing itself)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "sglang":
            sys.meta_path.remove(cls)
            register_placeholder_ops()
        return None


if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1" and not _LIBRARY:
    if "sglang" in sys.modules:  # too late to wait for its import (a process that loads this by hand)
        register_placeholder_ops()
    elif _DeclareOnSglangImport not in sys.meta_path:
        sys.meta_path.insert(0, _DeclareOnSglangImport)
