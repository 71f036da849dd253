"""The variants of model.onnx: fp16 (GPUs) and static int8 (CPUs), each with the record
of how it was made (for the card). `python -m training.add_int8` adds an int8 variant to an
existing package.

The int8 recipe (quantize_int8) uses 7-bit weights (reduce_range), which cannot saturate the int16
lanes of ONNX Runtime's non-VNNI x86 kernels, so embedserve's `auto` serves such a file on every
CPU (files with 8-bit weights, from before, only on CPUs with VNNI). The check runs the VNNI
kernels where the checking CPU has them and a CPU-independent simulation elsewhere
(training.export_checks.int8_kernels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from embedserve import package as pkg

VARIANTS = {  # name -> (file, target device, precision)
    "fp16": ("model.fp16.onnx", "cuda", "float16 weights and activations, float32 output"),
    "int8": (
        "model.int8.onnx",
        "cpu",
        "int8 QDQ: per-channel 7-bit int8 weights, uint8 activations",
    ),
}


CALIB_PERCENTILE = 99.999  # int8 activation ranges: this percentile of |x| on calibration images


def make_variant(
    variant: str, model_path: Path, dst: Path, calibration: np.ndarray, scratch: Path
) -> dict[str, Any]:
    """Write one variant of model.onnx; return how it was made (for the card)."""
    if variant == "fp16":
        return convert_fp16(model_path, dst)
    return quantize_int8(model_path, dst, calibration, scratch)


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """fp16 weights and activations; uint8 input and float32 output unchanged. The norm of the
    L2 normalization stays in fp32: a sum of squares can exceed fp16's 65504."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = [*DEFAULT_OP_BLOCK_LIST, "ReduceL2"]
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=blocked)
    sort_nodes(model.graph)  # the converter appends the casts it inserts at the end
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "fp32_ops": ["ReduceL2"],
    }


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder a graph's nodes topologically, in place (the order onnx.checker requires)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [all(i in ready for i in n.input) for n in pending]
        if not any(runnable):
            raise ValueError(f"graph has a cycle or a missing input near node {pending[0].name!r}")
        for node, ok in zip(pending, runnable, strict=True):
            if ok:
                ready.update(node.output)
                ordered.append(node)
        pending = [n for n, ok in zip(pending, runnable, strict=True) if not ok]
    del graph.node[:]
    graph.node.extend(ordered)


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, scratch: Path) -> dict[str, Any]:
    """Static int8 quantization in QDQ format, calibrated on uint8 NHWC images: per-channel int8
    weights within 7 bits (reduce_range, |q| <= 64) and uint8 activations. 7-bit weights keep
    ONNX Runtime's non-VNNI x86 u8s8 kernels (AVX2/AVX-512 VPMADDUBSW, which adds pairs of
    u8 x s8 products in saturating int16 lanes) exact: 2 x 255 x 64 < 32767, so the file computes
    the same integers on every CPU. The bit they lose is won back by keeping the first conv in
    fp32 and by a sequential bias correction (correct_biases). Activation ranges are the
    99.999th percentile of |x| over the calibration images.

    On the default package (against model.onnx, all 3925 Imagenette val images) this gave min
    cosine 0.9909 and max abs 0.074 at 1.9-2.0x fp32 (batch 16, AVX512-VNNI), where full-range
    u8s8 (8-bit weights, the former recipe, which saturates without VNNI) gave 0.9873 and 0.121
    at 2.1x, and plain reduce_range (first conv int8, no correction) 0.9748 and 0.132."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, images: np.ndarray, batch: int = 16) -> None:
            self.batches = iter(
                [{pkg.INPUT_NAME: images[i : i + batch]} for i in range(0, len(images), batch)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = scratch / "int8-prepared.onnx"
    quant_pre_process(str(src), str(prepared))  # shape inference + graph optimizations
    convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
    fp32_nodes = convs[:1]  # the stem: 3 input channels of normalized pixels, ~6% of the MACs
    quantize_static(
        str(prepared),
        str(dst),
        Batches(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=fp32_nodes,
        calibrate_method=CalibrationMethod.Percentile,
        extra_options={"CalibPercentile": CALIB_PERCENTILE},
    )
    corrected = correct_biases(prepared, dst, calibration)
    onnx.checker.check_model(str(dst), full_check=True)
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "weights": WEIGHTS_7BIT,
        "activations": "uint8 per tensor",
        "fp32_nodes": fp32_nodes,
        "bias_correction": {
            # each conv's int32 bias minus its per-channel mean output error (the QDQ graph run
            # unoptimized against fp32) on the calibration images, conv after conv
            "method": "sequential mean-error correction",
            "convs": corrected,
        },
        "calibration": {
            "method": "Percentile",
            "percentile": CALIB_PERCENTILE,
            "images": len(calibration),
        },
    }


WEIGHTS_7BIT = "int8 per channel, 7-bit (reduce_range)"  # embedserve.package reads "7-bit"


def correct_biases(prepared: Path, quantized: Path, calibration: np.ndarray) -> int:
    """Bias correction of a QDQ model, in place, conv by conv in graph order: the mean over the
    calibration images and positions of each output channel of the quantized conv (the graph
    run unoptimized, a CPU-independent computation of the quantized values) minus that of the
    fp32 conv is taken out of its int32 bias, after the convs before it were corrected. Rounding
    7-bit weights shifts these means; this returns them to fp32's. Returns how many convs."""
    import onnxruntime as ort
    from onnx import numpy_helper

    def conv_means(model: onnx.ModelProto, outputs: list[str], optimize: bool) -> list[np.ndarray]:
        tapped = onnx.ModelProto()
        tapped.CopyFrom(model)
        del tapped.graph.output[:]
        tapped.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outputs)
        options = ort.SessionOptions()
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            tapped.SerializeToString(), options, ["CPUExecutionProvider"]
        )
        sums: list[Any] = [0.0] * len(outputs)
        for i in range(0, len(calibration), 32):
            runs = session.run(outputs, {pkg.INPUT_NAME: calibration[i : i + 32]})
            sums = [
                s + r.astype(np.float64).mean((2, 3)).sum(0)
                for s, r in zip(sums, runs, strict=True)
            ]
        return [s / len(calibration) for s in sums]

    fp32 = onnx.load(str(prepared))
    model = onnx.load(str(quantized))
    fp32_convs = {n.name: n for n in fp32.graph.node if n.op_type == "Conv"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if sorted(n.name for n in convs) != sorted(fp32_convs) or "" in fp32_convs:
        raise ValueError(f"{quantized}: its convs are not those of {prepared} (by node name)")
    fp32_outputs = [fp32_convs[n.name].output[0] for n in convs]
    targets = conv_means(fp32, fp32_outputs, optimize=True)  # in the order of `convs`
    initializers = {t.name: t for t in model.graph.initializer}
    dequantized = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    corrected = 0
    for conv, target in zip(convs, targets, strict=True):
        bias = dequantized.get(conv.input[2]) if len(conv.input) > 2 else None
        if bias is None or bias.input[0] not in initializers:
            continue  # an fp32 conv (nodes_to_exclude), or one without a bias
        (mean,) = conv_means(model, [conv.output[0]], optimize=False)
        q = initializers[bias.input[0]]
        scale = numpy_helper.to_array(initializers[bias.input[1]]).astype(np.float64)
        usable = scale > 0  # a zero scale (all-zero weights) leaves its bias as it is
        shift = np.where(usable, (mean - target) / np.where(usable, scale, 1.0), 0.0)
        values = numpy_helper.to_array(q).astype(np.float64) - shift
        limits = np.iinfo(np.int32)
        values = np.clip(np.round(values), limits.min, limits.max).astype(np.int32)
        q.CopyFrom(numpy_helper.from_array(values, q.name))
        corrected += 1
    onnx.save(model, str(quantized))
    return corrected
