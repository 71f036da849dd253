"""The service a user writes from BentoML's documentation: the baseline (c) of benchmarks.serve_load.

One service class, one batchable API over PIL images (adaptive batching, max batch 32), the
package's fp32 `model.onnx` in an ONNX Runtime session with 2 threads, Pillow preprocessing as
the card describes (shorter side resized, centre crop, uint8 RGB), no other work. It is what
BentoML's "adaptive batching" and "ONNX" guides lead to, with the same model file and threads as
the served default, so the comparison measures what embedserve adds around the model:

    @bentoml.service
    class DocsEmbedder:
        @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=...)
        def embed(self, images: list[Image.Image]) -> np.ndarray: ...

    POST /embed   multipart/form-data, field `images` repeated -> [[float, ...], ...] (one row each)

    DOCS_MODEL=models/barlow-twins-resnet18-imagenette \\
        bentoml serve benchmarks.bentoml_docs_service:DocsEmbedder --port 3002
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort
from PIL import Image

MODEL = Path(os.environ.get("DOCS_MODEL", "models/barlow-twins-resnet18-imagenette"))
THREADS = int(os.environ.get("DOCS_THREADS", "2"))


@bentoml.service(workers=1, traffic={"timeout": 300})
class DocsEmbedder:
    def __init__(self) -> None:
        card = json.loads((MODEL / "card.json").read_text())
        self.size = card["input"]["height"]
        self.input_name = card["input"]["name"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        self.session = ort.InferenceSession(
            str(MODEL / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def _pixels(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))))
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return np.asarray(image, dtype=np.uint8)

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=10_000)
    def embed(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([self._pixels(image) for image in images])
        return self.session.run(None, {self.input_name: batch})[0]
