"""ONNX Runtime against PyTorch: run a graph file on the CPU and measure how far its embeddings
are from PyTorch's. Shared by the export's checks (training.export_checks) and by --init-from,
which refuses a rebuilt encoder that does not compute the package's graph (training.warmstart).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from embedserve import package as pkg
from training.models import EmbeddingGraph


@torch.no_grad()
def torch_embeddings(graph: nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """PyTorch fp32 reference: uint8 NHWC -> float32 NxD."""
    return torch.cat(
        [graph(torch.from_numpy(images[i : i + batch])) for i in range(0, len(images), batch)]
    ).numpy()


def cpu_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session: ort.InferenceSession, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 NHWC -> float32 NxD through an ONNX Runtime session."""
    return np.concatenate(
        [
            session.run([pkg.OUTPUT_NAME], {pkg.INPUT_NAME: images[i : i + batch]})[0]
            for i in range(0, len(images), batch)
        ]
    )


def parity(reference: np.ndarray, outputs: np.ndarray) -> tuple[float, float]:
    """(smallest cosine similarity between matching rows, largest absolute difference)."""
    ref, out = reference.astype(np.float64), outputs.astype(np.float64)
    cos = (ref * out).sum(1) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-12
    )
    return float(cos.min()), float(np.abs(ref - out).max())


def batch_consistency(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> float:
    """Largest absolute difference between a batch's rows and single-image runs of each image."""
    batched = run(images)
    singles = np.concatenate([run(images[i : i + 1]) for i in range(len(images))])
    return float(np.abs(batched.astype(np.float64) - singles).max())


def backbone_min_cosine(backbone: nn.Module, model_path: Path, images: torch.Tensor) -> float:
    """Min cosine between the exporter's graph of `backbone` (eval mode) and a graph file, on
    uint8 NCHW `images`."""
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    ours = torch_embeddings(EmbeddingGraph(backbone).eval(), nhwc)
    return parity(run_session(cpu_session(model_path), nhwc), ours)[0]
