"""Model packages: the contract between training (which writes them) and serving (which loads them).

A package is a folder `models/NAME/` holding `model.onnx` (fp32), optional variants
(`model.fp16.onnx` for GPUs, `model.int8.onnx` for CPUs with VNNI) and `card.json`, which says
everything the server needs: input size and layout, preprocessing, embedding size, the sha256 of
every file, the measured parity and quality. `card.schema.json` beside this module defines the
card; the exporter and this loader both validate against it.

    package = load_package()                 # models/DEFAULT, or a name, or a path
    encoder = Encoder(package, device="cpu")  # verifies the file, opens an ONNX Runtime session
    embeddings = encoder.embed_images(["cat.jpg", "dog.png"])  # float32 [2, D], L2-normalized

Loading refuses, with a `PackageError` that names the file and the reason: a card that fails the
schema, a model whose sha256 differs from the card (tampered or truncated), a model ONNX Runtime
cannot read, and a model whose inputs or outputs differ from the card.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnxruntime as ort

from embedserve.preprocess import Preprocess, preprocess_batch

SCHEMA_PATH = Path(__file__).with_name("card.schema.json")
CARD_FILE = "card.json"
MODEL_FILE = "model.onnx"  # the fp32 model, always present
INPUT_NAME = "images"  # uint8 NHWC RGB input of every exported graph
OUTPUT_NAME = "embeddings"  # float32 [N, D] L2-normalized output
DEFAULT_FILE = "DEFAULT"  # models/DEFAULT: one line, the folder name of the default package
# models/ at the repository root; EMBEDSERVE_MODELS_DIR overrides it (e.g. in a container).
MODELS_DIR = Path(
    os.environ.get("EMBEDSERVE_MODELS_DIR", Path(__file__).resolve().parents[1] / "models")
)
FP32 = "fp32"
# Where each variant is preferred (the card repeats it per variant as `target`).
VARIANT_FOR_DEVICE = {"cuda": "fp16", "cpu": "int8"}
_ORT_TYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}


class PackageError(RuntimeError):
    """A model package that cannot be served; the message names the file and the reason."""


@cache
def card_schema() -> dict[str, Any]:
    """The JSON Schema of card.json."""
    return json.loads(SCHEMA_PATH.read_text())


def validate_card(card: dict[str, Any], where: str = CARD_FILE) -> None:
    """Raise PackageError listing every way `card` fails the schema (`where` names it)."""
    validator = jsonschema.Draft202012Validator(card_schema())
    errors = sorted(validator.iter_errors(card), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [
            f"  {'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors
        ]
        raise PackageError(
            f"{where} does not match the card schema ({SCHEMA_PATH.name}):\n" + "\n".join(lines)
        )


def lineage_epochs(source: dict[str, Any] | None) -> int:
    """Epochs of the runs an encoder started from (a card's `training.init_from`, the record
    of `--init-from`), counting the first run too. Reads both forms: a reference that states
    its `total_epochs` (training/lineage.py), or the older nested copies, followed back to the
    first run."""
    total = 0
    while source:
        if source.get("total_epochs") is not None:
            return total + int(source["total_epochs"])
        total += int(source.get("epochs") or 0)
        source = source.get("init_from")
    return total


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_package_name(models_dir: str | os.PathLike = MODELS_DIR) -> str:
    """The folder name written in `models_dir/DEFAULT`."""
    path = Path(models_dir) / DEFAULT_FILE
    if not path.is_file():
        raise PackageError(
            f"no default model: {path} does not exist (it holds one line, the folder name of a "
            f"package in {models_dir}); pass a package name or path instead"
        )
    name = path.read_text().strip()
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise PackageError(f"{path} must hold one folder name of {models_dir}, not {name!r}")
    return name


def resolve_package(
    name_or_path: str | os.PathLike | None = None, models_dir: str | os.PathLike = MODELS_DIR
) -> Path:
    """The folder of a package: None -> models/DEFAULT; an existing folder -> itself; else a
    name under `models_dir`."""
    models_dir = Path(models_dir)
    if name_or_path is None:
        name_or_path = default_package_name(models_dir)
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if len(path.parts) == 1 and (models_dir / path).is_dir():
        return models_dir / path
    known = (
        sorted(p.name for p in models_dir.iterdir() if (p / CARD_FILE).is_file())
        if models_dir.is_dir()
        else []
    )
    raise PackageError(
        f"model package {str(name_or_path)!r} not found (neither a folder nor a name in {models_dir}; "
        f"packages there: {', '.join(known) or 'none'})"
    )


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo; empty where
    there is none (not Linux)."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in lines:
        key, colon, value = line.partition(":")
        if colon and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "asimddp"}  # x86, x86, Arm


def card_preprocess(card: dict[str, Any]) -> Preprocess:
    """How a decoded image becomes one input row, as a card's `preprocess` section says."""
    p = card.get("preprocess")
    if p is None:
        raise ValueError(f"card {card.get('name')!r} has no preprocess section")
    return Preprocess(p["resize"], p["crop"]["height"], p["crop"]["width"], p["interpolation"])


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI int8 dot products (x86 AVX512-VNNI or AVX-VNNI, Arm dot product),
    where the int8 variant is both fast and within its card's parity.

    Without VNNI, ONNX Runtime's x86 u8s8 kernels (AVX2's VPMADDUBSW) are still 1.35-1.76x fp32
    but add pairs of products in saturating 16-bit lanes: on an AVX2-only Zen 3 the default
    model's int8 embeddings of Imagenette val fell to a min cosine of 0.817 against fp32 (7% of
    the images under the card's 0.99), so the choice there is fp32.
    """
    return bool(cpu_flags() & VNNI_FLAGS)


def int8_is_7bit(card: dict[str, Any]) -> bool:
    """Whether the card's int8 file has 7-bit weights (reduce_range): no u8s8 kernel saturates
    on it (2 x 255 x 64 < 32767), so it keeps its parity on CPUs without VNNI too."""
    return "7-bit" in str(card["variants"].get("int8", {}).get("conversion", {}).get("weights"))


INT8_WITHOUT_VNNI = (
    "int8 on a CPU without VNNI: ONNX Runtime's u8s8 kernels saturate here, and embeddings can "
    "differ from fp32 by more than the card's parity (min cosine 0.817 on Imagenette val on an "
    "AVX2 CPU, against 0.99 in the card); variant auto or fp32 avoids this"
)


@dataclass(frozen=True)
class ModelPackage:
    """A package folder and its schema-valid card (files are verified when a variant is opened)."""

    path: Path
    card: dict[str, Any]

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def embedding_dim(self) -> int:
        return self.card["embedding_dim"]

    @property
    def preprocess(self) -> Preprocess:
        """How a decoded image becomes one input row, as the card says."""
        return card_preprocess(self.card)

    @property
    def variants(self) -> list[str]:
        """Every variant of the package: fp32 first."""
        return [FP32, *self.card["variants"]]

    def file(self, variant: str = FP32) -> Path:
        """The ONNX file of a variant."""
        if variant == FP32:
            return self.path / MODEL_FILE
        if variant not in self.card["variants"]:
            raise PackageError(
                f"{self.path}: no {variant!r} variant (the card lists {', '.join(self.variants)})"
            )
        return self.path / self.card["variants"][variant]["file"]

    def expected_sha256(self, variant: str = FP32) -> str:
        return self.card["sha256"] if variant == FP32 else self.card["variants"][variant]["sha256"]

    def verify_file(self, variant: str = FP32) -> Path:
        """Check that a variant's file exists and has the card's sha256; return its path."""
        path = self.file(variant)
        if not path.is_file():
            raise PackageError(f"{path}: missing (the card of {self.path} lists it)")
        actual, expected = sha256_file(path), self.expected_sha256(variant)
        if actual != expected:
            raise PackageError(
                f"{path}: sha256 {actual} differs from the card's {expected} "
                f"({path.stat().st_size} bytes): the file was modified or truncated; refusing to serve it"
            )
        return path

    def choose_variant(self, device: str) -> str:
        """The variant to run on `device` ("cuda" or "cpu"): fp16 on CUDA, int8 on a CPU when
        it has 7-bit weights or the CPU has VNNI (int8_is_7bit, cpu_has_vnni); fp32 otherwise."""
        preferred = VARIANT_FOR_DEVICE.get(device)
        if preferred is None:
            raise ValueError(
                f"device must be one of {', '.join(VARIANT_FOR_DEVICE)}, not {device!r}"
            )
        if preferred not in self.card["variants"]:
            return FP32
        if preferred == "int8" and not (cpu_has_vnni() or int8_is_7bit(self.card)):
            return FP32
        return preferred


def load_package(
    name_or_path: str | os.PathLike | None = None, models_dir: str | os.PathLike = MODELS_DIR
) -> ModelPackage:
    """Find a package (None: models/DEFAULT) and validate its card against the schema."""
    path = resolve_package(name_or_path, models_dir)
    card_path = path / CARD_FILE
    if not card_path.is_file():
        raise PackageError(f"{path} is not a model package: {CARD_FILE} is missing")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{card_path}: not valid JSON ({e})") from e
    validate_card(card, str(card_path))
    return ModelPackage(path, card)


def check_session_io(session, card: dict[str, Any], where: str) -> None:
    """Raise PackageError unless an ONNX Runtime session's one input and one output are those of
    the card (names, element types, shapes with a dynamic batch)."""
    inp, out, dim = card["input"], card["output"], card["embedding_dim"]
    expected_in = (
        inp["name"],
        _ORT_TYPES[inp["dtype"]],
        [inp["height"], inp["width"], inp["channels"]],
    )
    expected_out = (out["name"], _ORT_TYPES[out["dtype"]], [dim])
    problems = []
    for kind, nodes, (name, type_, tail) in (
        ("input", session.get_inputs(), expected_in),
        ("output", session.get_outputs(), expected_out),
    ):
        if len(nodes) != 1:
            problems.append(
                f"{len(nodes)} {kind}s ({', '.join(n.name for n in nodes)}), expected one named {name!r}"
            )
            continue
        node = nodes[0]
        shape = list(node.shape)
        batch_is_dynamic = len(shape) == len(tail) + 1 and not isinstance(shape[0], int)
        if node.name != name or node.type != type_ or shape[1:] != tail or not batch_is_dynamic:
            problems.append(
                f"{kind} {node.name!r} {node.type} {shape}, the card says {name!r} {type_} [N, {', '.join(map(str, tail))}]"
            )
    if problems:
        raise PackageError(f"{where} does not match its card: " + "; ".join(problems))


# Device nodes through which the CUDA driver reaches a GPU: /dev/nvidia0, 1, ... (Linux, and
# in containers given a GPU), /dev/dxg (WSL 2), /dev/nvhost-ctrl-gpu (Jetson).
_GPU_NODE = re.compile(r"nvidia\d+|dxg|nvhost-ctrl-gpu")


def gpu_present(dev: str | os.PathLike = "/dev", environ: dict[str, str] | None = None) -> bool:
    """Whether this process can see a GPU for CUDA, decided without loading CUDA (no library is
    opened, nothing is printed): on Linux, a GPU device node in `dev` (the CUDA driver opens
    /dev/nvidia<N>; without one, CUDA cannot start), and CUDA_VISIBLE_DEVICES not "" or -1
    (which hide every GPU). Where there is no /dev (not Linux) it answers True: try CUDA."""
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if visible is not None and (not visible.strip() or visible.strip().startswith("-1")):
        return False
    if not sys.platform.startswith("linux"):
        return True
    try:
        names = os.listdir(dev)
    except OSError:
        return True  # no /dev to look at: let ONNX Runtime answer
    return any(_GPU_NODE.fullmatch(name) for name in names)


NO_GPU = (
    "device 'cuda': no GPU is visible here (no /dev/nvidia<N> device node, or "
    "CUDA_VISIBLE_DEVICES hides them all); use device auto or cpu to run on the CPU"
)


def auto_tries_cuda() -> bool:
    """Whether device "auto" tries the CUDA execution provider: onnxruntime-gpu is installed
    and a GPU is present (`gpu_present`). On a machine without a GPU it is never tried, so
    ONNX Runtime's "Failed to create CUDAExecutionProvider" error is never printed there."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and gpu_present()


def cuda_session_starts(package: ModelPackage) -> bool:
    """Whether ONNX Runtime really runs a session of `package` on CUDA here.

    `get_available_providers()` lists CUDA wherever onnxruntime-gpu is installed, even without a
    GPU or the CUDA libraries; only a session's `get_providers()` tells. Opens the smallest file,
    and only where a GPU is present (`gpu_present`): without one the answer is False at once.
    """
    if not auto_tries_cuda():
        return False
    smallest = min(package.variants, key=lambda v: package.file(v).stat().st_size)
    try:
        session = ort.InferenceSession(
            str(package.file(smallest)),
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
    except Exception:  # noqa: BLE001 (a provider that fails to load is the answer "no")
        return False
    return "CUDAExecutionProvider" in session.get_providers()


class Encoder:
    """An ONNX Runtime session on one verified variant of a package.

    `device`: "cpu", "cuda", or "auto" (CUDA when a GPU is present and a CUDA session really
    starts, else the CPU, without trying CUDA where no GPU is present: see `auto_tries_cuda`).
    "cuda" raises PackageError where no GPU is present or CUDA does not start.
    `variant`: "auto" (the package's choice for the device, see `ModelPackage.choose_variant`)
    or fp32 / fp16 / int8. `intra_op_threads`: ONNX Runtime sizes its pool to the host's cores,
    not to a container's limit, so a server sets it per worker.
    """

    def __init__(
        self,
        package: ModelPackage,
        variant: str = "auto",
        device: str = "auto",
        intra_op_threads: int | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        if variant != "auto" and variant not in package.variants:
            raise PackageError(
                f"{package.path}: no {variant!r} variant (the card lists {', '.join(package.variants)})"
            )
        self.package = package
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if device == "cuda" and not gpu_present():
            raise PackageError(NO_GPU)
        want_cuda = device == "cuda" or (device == "auto" and auto_tries_cuda())
        self.session = None
        if want_cuda:
            self.variant = package.choose_variant("cuda") if variant == "auto" else variant
            self.session = self._open(options, ["CUDAExecutionProvider", "CPUExecutionProvider"])
            # get_available_providers() lists CUDA even where it cannot load: ask the session
            if "CUDAExecutionProvider" not in self.session.get_providers():
                if device == "cuda":
                    raise PackageError(
                        "device 'cuda': the CUDA execution provider could not start on this machine"
                    )
                self.session = None
        if self.session is None:
            self.variant = package.choose_variant("cpu") if variant == "auto" else variant
            self.session = self._open(options, ["CPUExecutionProvider"])
            if self.variant == "int8" and not (cpu_has_vnni() or int8_is_7bit(package.card)):
                warnings.warn(INT8_WITHOUT_VNNI, RuntimeWarning, stacklevel=2)
        self.providers: list[str] = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.input_name = package.card["input"]["name"]
        self.output_name = package.card["output"]["name"]

    def _open(self, options, providers: list[str]):
        """Verify the variant's file, open it, check its I/O against the card and run one image."""
        card = self.package.card
        path = self.package.verify_file(self.variant)
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises its own exception types for unreadable models
            raise PackageError(f"{path}: ONNX Runtime cannot load it: {e}") from e
        check_session_io(session, card, str(path))
        inp = card["input"]
        probe = np.zeros((1, inp["height"], inp["width"], inp["channels"]), np.uint8)
        out = session.run([card["output"]["name"]], {inp["name"]: probe})[0]
        if out.shape != (1, card["embedding_dim"]) or not np.isfinite(out).all():
            raise PackageError(
                f"{path}: one black image gives {out.dtype} {list(out.shape)} "
                f"({'finite' if np.isfinite(out).all() else 'non-finite'}), the card says "
                f"float32 [1, {card['embedding_dim']}] finite"
            )
        return session

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] RGB (the card's size) -> float32 [N, D], L2-normalized rows."""
        inp = self.package.card["input"]
        expected = (inp["height"], inp["width"], inp["channels"])
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"images must be uint8 [N, {', '.join(map(str, expected))}], got {images.dtype} {list(images.shape)}"
            )
        if len(images) == 0:
            return np.zeros((0, self.package.embedding_dim), np.float32)
        images = np.ascontiguousarray(images)
        if self.on_cuda:
            # I/O binding: the input is copied to the GPU once, the output stays there until
            # one copy back, instead of the copies run() makes through its own buffers.
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, images)
            binding.bind_output(self.output_name, "cuda")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return self.session.run([self.output_name], {self.input_name: images})[0]

    def embed_images(self, items: Sequence) -> np.ndarray:
        """Image files, bytes, PIL images or uint8 HWC arrays -> float32 [N, D], preprocessed as
        the card says (embedserve.preprocess)."""
        return self.embed(preprocess_batch(list(items), self.package.preprocess))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m embedserve.package [NAME_OR_PATH]`: verify every file of a package (default:
    models/DEFAULT) as the server would open it, and print what its card says."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m embedserve.package", description=main.__doc__)
    parser.add_argument("package", nargs="?", default=None, help="name in models/ or a folder")
    args = parser.parse_args(argv)
    try:
        package = load_package(args.package)
        for variant in package.variants:
            encoder = Encoder(package, variant=variant, device="cpu", intra_op_threads=1)
            parity = (
                package.card["parity"]
                if variant == FP32
                else package.card["variants"][variant]["parity"]
            )
            print(
                f"{package.file(variant)}: ok ({variant}, sha256 verified, "
                f"{encoder.input_name} uint8 [N, {package.card['input']['height']}, "
                f"{package.card['input']['width']}, 3] -> {encoder.output_name} [N, {package.embedding_dim}], "
                f"min cosine to PyTorch {parity['min_cosine']:.6f})"
            )
    except PackageError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    knn = ", ".join(
        f"k={m['k']} {m['top1']} ({m['dataset']} {m['split']})"
        for m in package.card["metrics"]["knn"]
    )
    print(
        f"{package.name}: {package.card['method']} {package.card['backbone']}; kNN top-1 {knn or 'not recorded'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
