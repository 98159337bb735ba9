"""Helpers the benchmarks share."""


def cuda_sync() -> None:
    """Wait for queued GPU work, so a timer stops when the work is done (no-op without a GPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
