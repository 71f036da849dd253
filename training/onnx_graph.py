"""The exported graph as an ONNX file: torch.onnx.export of `training.models.EmbeddingGraph`
(uint8 NHWC in, L2-normalized float32 out, dynamic batch), checked by onnx.checker.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from embedserve import package as pkg

OPSET = 17


def export_onnx(graph: nn.Module, path: Path, height: int, width: int, opset: int = OPSET) -> None:
    """torch.onnx.export with a dynamic batch; checked by onnx.checker (with shape inference).

    The TorchScript exporter (dynamo=False): still in torch 2.14 and needs no onnxscript; the
    dynamo exporter (torch's default) would add that dependency for the same graph.
    """
    example = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            input_names=[pkg.INPUT_NAME],
            output_names=[pkg.OUTPUT_NAME],
            dynamic_axes={pkg.INPUT_NAME: {0: "N"}, pkg.OUTPUT_NAME: {0: "N"}},
            opset_version=opset,
            do_constant_folding=True,  # folds BatchNorm into the convolutions
        )
    onnx.checker.check_model(str(path), full_check=True)
