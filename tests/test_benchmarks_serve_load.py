"""The pure parts of the serving load benchmark (benchmarks.http_load) and its naive server.

The percentile and multipart helpers decide what the benchmark reports and what the servers
receive, so they are pinned against independent implementations (numpy, the standard library's
MIME parser). One slow test starts the naive PyTorch server and checks a real /embed answer.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import json
import os
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

from benchmarks.common import ROOT
from benchmarks.http_load import (
    BOUNDARY,
    ServerProcess,
    check_answer,
    content_type,
    free_port,
    latency_summary_ms,
    multipart_body,
    percentile,
    run_point,
)


def _jpeg(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _parse_multipart(body: bytes, ctype: str) -> list[tuple[str, str, str, bytes]]:
    """(field name, filename, content type, bytes) of every part, by the stdlib MIME parser."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + body
    )
    assert msg.is_multipart()
    return [
        (
            part.get_param("name", header="content-disposition"),
            part.get_filename(),
            part.get_content_type(),
            part.get_payload(decode=True),
        )
        for part in msg.iter_parts()
    ]


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy_linear_interpolation(q, n):
    values = np.random.default_rng(n).exponential(size=n).tolist()
    assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)


def test_percentile_ignores_input_order_and_handles_edge_cases():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([5.0], 99) == 5.0
    assert np.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_reports_milliseconds_in_order():
    s = latency_summary_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= 100
    assert s["mean_ms"] == pytest.approx(50.5)


@pytest.mark.parametrize("count", [1, 8])
def test_multipart_body_parses_back_into_the_same_files(count):
    files = [_jpeg(i) for i in range(count)]
    parts = _parse_multipart(multipart_body(files), content_type(BOUNDARY))
    assert [p[0] for p in parts] == ["images"] * count
    assert [p[2] for p in parts] == ["image/jpeg"] * count
    assert len({p[1] for p in parts}) == count  # distinct file names
    assert [p[3] for p in parts] == files  # byte for byte, in order


def test_multipart_body_keeps_crlf_and_dashes_inside_files():
    tricky = b"\r\n--not-the-boundary\r\n\r\n\x00\xff--"
    parts = _parse_multipart(multipart_body([tricky, b""], "B0UNDARY"), content_type("B0UNDARY"))
    assert [p[3] for p in parts] == [tricky, b""]


def test_multipart_body_refuses_a_file_containing_the_boundary():
    with pytest.raises(ValueError, match="boundary"):
        multipart_body([b"xx--" + BOUNDARY.encode() + b"xx"])


def test_check_answer_counts_rows_and_their_size():
    check_answer(json.dumps({"model": "m", "dim": 2, "embeddings": [[0, 1], [1, 0]]}).encode(), 2)
    for bad in (
        {"model": "m", "dim": 2, "embeddings": [[0, 1]]},  # one row for two images
        {"model": "m", "dim": 3, "embeddings": [[0, 1], [1, 0]]},  # rows shorter than dim
        {"error": "nope"},
        [[0, 1]],  # a BentoML array answer with one row for two images
        [[0, 1], [1]],  # rows of different sizes
    ):
        with pytest.raises(RuntimeError):
            check_answer(json.dumps(bad).encode(), 2)
    check_answer(json.dumps([[0, 1], [1, 0]]).encode(), 2)  # a BentoML API's array answer


def _short_load(url: str, files: list[bytes]):
    """One second of load at concurrency 2, one file per request, to `url`/embed."""
    bodies = [multipart_body([f]) for f in files]
    return asyncio.run(
        run_point(url + "/embed", bodies, content_type(), 1, 2, duration=1.0, warmup=0.3)
    )


@pytest.mark.slow
def test_the_bentoml_docs_service_embeds_as_the_package_does(tmp_path):
    """The baseline (c) serves the same model: its rows match the package's fp32 embeddings of
    the same photos (its own Pillow preprocessing, as the card describes), and the load
    generator drives it."""
    pytest.importorskip("aiohttp", reason="the load generator needs aiohttp")
    from benchmarks.serve_load_baselines import open_package
    from benchmarks.serve_load_checks import docs_command
    from embedserve.package import Encoder, card_preprocess
    from embedserve.preprocess import preprocess_batch

    package = open_package(None)
    port = free_port()
    env = {"DOCS_MODEL": str(package.path), "DOCS_THREADS": "1"}
    files = [_jpeg(0, 160), _jpeg(1, 200)]
    with ServerProcess(
        docs_command(port), port, tmp_path / "docs.log", env, cwd=ROOT, ready_timeout=120
    ) as server:
        request = urllib.request.Request(
            server.url + "/embed",
            data=multipart_body(files),
            headers={"Content-Type": content_type()},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            served = np.array(json.loads(r.read()), dtype=np.float32)
        point = _short_load(server.url, files)
        assert point.errors == 0 and point.requests > 0
    encoder = Encoder(package, variant="fp32", device="cpu", intra_op_threads=1)
    expected = encoder.embed(preprocess_batch(files, card_preprocess(package.card)))
    assert served.shape == expected.shape
    # the same model; Pillow's resize in both (differences only from rounding)
    cos = (served * expected).sum(axis=1) / np.linalg.norm(served, axis=1)
    assert cos.min() > 0.99


@pytest.mark.slow
def test_naive_server_answers_embed_and_the_load_generator_drives_it(tmp_path):
    pytest.importorskip("torch", reason="the naive server needs torch (the train extra)")
    pytest.importorskip("torchvision", reason="the naive server needs torchvision")
    pytest.importorskip("aiohttp", reason="the load generator needs aiohttp")
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.naive_torch_server", "--port", str(port)]
    with ServerProcess(cmd, port, tmp_path / "naive.log", cwd=ROOT, ready_timeout=120) as server:
        files = [_jpeg(0, 160), _jpeg(1, 200)]
        request = urllib.request.Request(
            server.url + "/embed",
            data=multipart_body(files),
            headers={"Content-Type": content_type()},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200
            answer = json.loads(r.read())
        assert answer["dim"] == 512
        z = np.array(answer["embeddings"])
        assert z.shape == (2, 512)
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)

        point = _short_load(server.url, files)
        assert point.errors == 0 and point.requests > 0
        assert point.p50_ms <= point.p99_ms
        pid = server.proc.pid
    with pytest.raises(ProcessLookupError):  # the whole process group is gone
        os.killpg(pid, 0)


def _baselines():
    from benchmarks import serve_load_baselines

    return serve_load_baselines


def _report():
    from benchmarks import serve_load_report

    return serve_load_report


def test_server_settings_read_the_services_info():
    info = {
        "model": {"name": "simsiam-resnet18-imagenette"},
        "variant": "int8",
        "provider": "CPUExecutionProvider",
        "threads": {"intra_op": 2, "decode": 2},
        "batching": {"max_batch_size": 32, "max_latency_ms": 10000},
    }
    s = _baselines().server_settings(info, {})
    assert s == {
        "package": "simsiam-resnet18-imagenette",
        "variant": "int8",
        "device": "cpu",
        "threads": 2,
        "max_batch_size": 32,
    }
    cuda = _baselines().server_settings({**info, "provider": "CUDAExecutionProvider"}, {})
    assert cuda["device"] == "cuda"


def test_server_settings_fall_back_to_the_environment():
    env = {
        "EMBEDSERVE_THREADS": "3",
        "EMBEDSERVE_MAX_BATCH_SIZE": "16",
        "EMBEDSERVE_VARIANT": "fp32",
    }
    s = _baselines().server_settings({}, env)
    assert (s["threads"], s["max_batch_size"], s["variant"], s["device"]) == (3, 16, "fp32", "cpu")


def _row(c: int, k: int, img_s: float) -> dict:
    return {"concurrency": c, "images_per_request": k, "img_s": img_s}


def test_ratios_at_concurrency_16_against_the_pipeline_and_the_naive_server():
    service = [_row(4, 1, 50.0), _row(16, 1, 180.0), _row(16, 8, 255.0)]
    naive = [_row(16, 1, 60.0), _row(16, 8, 150.0)]
    pipeline = {
        "rows": [
            {"batch": 1, "img_s": 250.0},
            {"batch": 8, "img_s": 300.0},
            {"batch": 32, "img_s": 400.0},
        ]
    }
    r = _report().ratios(service, naive, pipeline, max_batch=32)
    assert r["concurrency"] == 16
    one, eight = r["by_images_per_request"]["1"], r["by_images_per_request"]["8"]
    assert one["vs_pipeline"] == pytest.approx(0.72) and one["vs_pipeline_met"]  # target 0.6
    assert eight["vs_pipeline"] == pytest.approx(0.85) and eight["vs_pipeline_met"]  # target 0.85
    assert eight["vs_pipeline_max_batch"] == pytest.approx(255 / 400, abs=1e-3)
    assert one["vs_naive"] == 3.0 and one["vs_naive_met"]
    assert eight["vs_naive"] == 1.7 and not eight["vs_naive_met"]  # target 2x


def test_ratios_fall_back_to_the_highest_concurrency_measured():
    r = _report().ratios([_row(1, 1, 10.0), _row(4, 1, 20.0)], [], None, None)
    assert r["concurrency"] == 4
    assert r["by_images_per_request"]["1"] == {"http_img_s": 20.0}


def test_the_json_body_of_v1_embeddings_holds_each_file_as_a_data_uri():
    import base64

    from benchmarks.http_load import embeddings_json_body

    files = [_jpeg(1), _jpeg(2)]
    body = json.loads(embeddings_json_body(files, "base64", model="m"))
    assert body["encoding_format"] == "base64" and body["model"] == "m"
    assert [base64.b64decode(u.split(",", 1)[1]) for u in body["input"]] == files
    assert all(u.startswith("data:image/jpeg;base64,") for u in body["input"])
    assert "model" not in json.loads(embeddings_json_body(files))


def test_check_answer_reads_the_openai_shape_too():
    rows = [{"object": "embedding", "index": i, "embedding": [0.0, 1.0]} for i in range(2)]
    check_answer(json.dumps({"object": "list", "data": rows}).encode(), 2)
    with pytest.raises(RuntimeError):  # LoadError
        check_answer(json.dumps({"object": "list", "data": rows[:1]}).encode(), 2)


def test_speed_check_ratios_are_taken_within_each_run(tmp_path):
    from benchmarks.serve_load_checks import _ratio, idle_copies
    from embedserve.package import load_package

    rows = {"a": {"img_s_runs": [90.0, 100.0, 50.0]}, "b": {"img_s_runs": [100.0, 100.0, 100.0]}}
    assert _ratio(rows, "a", "b") == {"median": 0.9, "runs": [0.9, 1.0, 0.5]}
    package = load_package()
    copies = idle_copies(package, 2, tmp_path)
    names = [json.loads((c / "card.json").read_text())["name"] for c in copies]
    assert names == [f"{package.name}-idle-1", f"{package.name}-idle-2"]
    assert (copies[0] / "model.onnx").resolve() == (package.path / "model.onnx").resolve()
