"""The error handler and the app factory (embedserve.http.errors, .app, .schemas), in-process:
each ClientError family answers its status and JSON body, Overloaded a 503, anything else stays
a server error; and the plumbing modules import without loading a model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from embedserve.batching import Overloaded
from embedserve.http.errors import ClientError, error_response
from embedserve.http.schemas import json_response, multipart_body
from tests.embedserve.http_app import Client, tiny_app
from tests.embedserve.server import REPO


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(tiny_app(), raise_app_exceptions=False)


@pytest.mark.parametrize("status", [400, 401, 403, 409, 413, 415, 503])
def test_each_client_error_answers_its_status_and_a_json_error(client, status):
    response = client.get("/raise", params={"status": status})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": f"status {status}"}  # no "files" when none are named
    assert ("retry-after" in response.headers) == (status == 503)


def test_a_client_error_that_names_files_lists_them(client):
    response = client.get("/raise", params={"status": 415, "files": 2})
    assert response.status_code == 415
    assert response.json() == {
        "error": "status 415",
        "files": [
            {"file": "images[0]", "problem": "bad"},
            {"file": "images[1]", "problem": "bad"},
        ],
    }


def test_an_overloaded_batcher_answers_503_retry_later(client):
    response = client.get("/raise", params={"kind": "overloaded"})
    assert response.status_code == 503
    assert response.json() == {"error": "the batch queue is full; retry later"}


def test_any_other_exception_is_not_turned_into_a_4xx(client):
    response = client.get("/raise", params={"kind": "other"})
    assert response.status_code == 500
    with pytest.raises(TypeError):
        error_response(RuntimeError("a bug"))


def test_the_error_response_carries_the_headers_given():
    response = error_response(ClientError(401, "no", headers={"WWW-Authenticate": "Bearer"}))
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert error_response(Overloaded("full")).status_code == 503


def test_the_app_serves_no_docs_pages_of_its_own(client):
    # FastAPI's are off: BentoML serves the spec (/docs.json); /docs is the page module's
    # Swagger UI over it (embedserve.page)
    for path in ("/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404


def test_json_response_writes_float32_arrays_exactly():
    x = np.array([[0.1, 1 / 3]], np.float32)
    response = json_response({"embeddings": x})
    assert response.media_type == "application/json"
    back = np.asarray(json.loads(response.body)["embeddings"], np.float32)
    np.testing.assert_array_equal(back, x)


def test_the_multipart_body_documents_the_image_limit_and_json_fields():
    spec = multipart_body(7, {"metadata": {"type": "array"}, "k": {"type": "integer"}})
    content = spec["requestBody"]["content"]["multipart/form-data"]
    assert content["schema"]["properties"]["images"]["maxItems"] == 7
    assert content["schema"]["required"] == ["images"]
    assert content["encoding"] == {
        "images": {"contentType": "image/*"},
        "metadata": {"contentType": "application/json"},
    }


def test_the_plumbing_imports_without_loading_a_model_or_the_service():
    code = (
        "import sys, pkgutil, importlib, embedserve.http\n"
        "for m in pkgutil.walk_packages(embedserve.http.__path__, 'embedserve.http.'):\n"
        "    importlib.import_module(m.name)\n"
        "from embedserve.config import ServeConfig\n"
        "from embedserve.http.app import create_app\n"
        "create_app(ServeConfig())\n"
        "loaded = [m for m in ('embedserve.service', 'embedserve.package', 'onnxruntime',\n"
        "                      'embedserve.index', 'faiss', 'torch') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
