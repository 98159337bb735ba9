"""Batched decode + resize with NVIDIA DALI (nvJPEG / hardware decoder on a GPU, libjpeg-turbo on the CPU).

One DALI pipeline is built per worker for the fixed set of views; each call feeds a batch of
encoded images and the per-sample output sizes (known from the header probe, so views are
never upscaled and match the PIL path's sizes).
"""

from __future__ import annotations

import numpy as np

from engine.core.stage import ImageView
from engine.image.decode import fit_size


class DaliDecoder:
    def __init__(self, views: tuple[ImageView, ...], batch_size: int, threads: int, device: str):
        from nvidia.dali import fn, pipeline_def, types

        self.views = views
        self.batch_size = batch_size
        self.on_gpu = device.startswith("cuda")
        device_id = (int(device.split(":")[1]) if ":" in device else 0) if self.on_gpu else None

        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device="mixed" if self.on_gpu else "cpu",
                                       output_type=types.RGB)  # applies EXIF orientation
            outputs = []
            for view in views:
                width = fn.external_source(name=f"{view.name}.w", dtype=types.FLOAT, ndim=0)
                height = fn.external_source(name=f"{view.name}.h", dtype=types.FLOAT, ndim=0)
                outputs.append(fn.resize(images, resize_x=width, resize_y=height, antialias=True))
            return tuple(outputs)

        self.pipeline = pipeline()
        self.pipeline.build()

    def decode(self, datas: list[bytes], sizes: list[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
        """``sizes`` are (width, height) after EXIF orientation; raises if any image fails."""
        out: list[dict[str, np.ndarray]] = []
        for start in range(0, len(datas), self.batch_size):
            chunk, chunk_sizes = datas[start:start + self.batch_size], sizes[start:start + self.batch_size]
            self.pipeline.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in chunk])
            for view in self.views:
                fitted = [fit_size(w, h, view.max_side) for w, h in chunk_sizes]
                self.pipeline.feed_input(f"{view.name}.w", [np.float32(w) for w, _ in fitted])
                self.pipeline.feed_input(f"{view.name}.h", [np.float32(h) for _, h in fitted])
            results = self.pipeline.run()
            arrays = [r.as_cpu() if self.on_gpu else r for r in results]
            for i in range(len(chunk)):
                out.append({view.name: np.array(arrays[v].at(i)) for v, view in enumerate(self.views)})
        return out
