"""Several models in one server, in process: the settings, the choice of a request's model, the
packages' names and the metrics of each model. (A real server of two models:
test_service_models.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry

from embedserve.config import ConfigError, ServeConfig, load_config
from embedserve.http.errors import ClientError
from embedserve.http.jsonbody import served_model
from embedserve.http.schemas import embeddings_body
from embedserve.package import CARD_FILE, PackageError, load_package
from embedserve.registry import load_packages
from embedserve.telemetry import Telemetry
from tests.embedserve.server import REPO, renamed_copy
from tests.embedserve.test_telemetry import samples


def test_models_from_the_environment_and_from_a_toml_list(tmp_path):
    cfg = load_config(environ={"EMBEDSERVE_MODELS": " a, b ,c,"})
    assert cfg.models == ("a", "b", "c") and cfg.model_refs == ["a", "b", "c"]
    file = tmp_path / "serve.toml"
    file.write_text('models = ["x", "/abs/y"]\n')
    assert load_config(environ={"EMBEDSERVE_CONFIG": str(file)}).model_refs == ["x", "/abs/y"]
    assert load_config(environ={}).model_refs == [None]  # models/DEFAULT
    assert load_config(environ={"EMBEDSERVE_MODEL": "m"}).model_refs == ["m"]
    assert ServeConfig(models=["a", "b"]).models == ("a", "b")  # a list given in code


@pytest.mark.parametrize(
    ("environ", "toml", "words"),
    [
        ({"EMBEDSERVE_MODEL": "a", "EMBEDSERVE_MODELS": "a,b"}, "", "not both"),
        ({"EMBEDSERVE_MODELS": "a"}, 'model = "b"\n', "not both"),
        ({"EMBEDSERVE_MODELS": ","}, "", "one or more"),
        ({"EMBEDSERVE_MODELS": "a,b,a"}, "", "lists a package twice"),
        ({}, "models = 3\n", "models must be a list"),
        ({}, "models = [1, 2]\n", "models must be a list"),
    ],
)
def test_bad_model_lists_are_refused_with_a_clear_message(tmp_path, environ, toml, words):
    if toml:
        file = tmp_path / "serve.toml"
        file.write_text(toml)
        environ = {**environ, "EMBEDSERVE_CONFIG": str(file)}
    with pytest.raises(ConfigError, match=words):
        load_config(environ=environ)


def test_setting_both_stops_the_server_at_start_up_with_the_message():
    env = {"EMBEDSERVE_MODEL": "a", "EMBEDSERVE_MODELS": "a,b", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", "import embedserve.service"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "set either model (EMBEDSERVE_MODEL, one model) or models" in done.stderr


def test_a_request_gets_the_model_it_names_or_the_first():
    served = ["alpha", "beta"]
    assert served_model(None, served) == "alpha"
    assert served_model("beta", served) == "beta"
    with pytest.raises(ClientError) as e:
        served_model("gamma", served)
    assert e.value.status == 404
    assert "'gamma' is not served here; this server serves 'alpha', 'beta'" in e.value.error
    with pytest.raises(ClientError) as e:
        served_model(["alpha"], served)
    assert e.value.status == 400 and "model must be a string" in e.value.error


def test_packages_load_in_order_and_two_of_one_name_are_refused(tmp_path):
    src = load_package().path
    other = renamed_copy(src, tmp_path / "other", "other-name")
    twin = renamed_copy(src, tmp_path / "twin", load_package().name)
    packages = load_packages(ServeConfig(models=(str(other), str(src))))
    assert [p.name for p in packages] == ["other-name", load_package().name]
    assert json.loads((other / CARD_FILE).read_text())["sha256"] == load_package().card["sha256"]
    packages[0].verify_file()  # the symlinked ONNX file has the card's sha256
    with pytest.raises(PackageError, match="have the same model name"):
        load_packages(ServeConfig(models=(str(src), str(twin))))


def test_each_model_counts_into_its_own_label_of_the_same_metrics():
    registry = CollectorRegistry()
    first = Telemetry("one", max_batch_size=8, registry=registry)
    second = first.sibling("two")  # registering the metrics twice would raise
    first.batch(3, 0.01, [0.0] * 3)
    second.batch(2, 0.01, [0.0] * 2)
    got = samples(registry)
    assert got[("embedserve_images_embedded_total", ("model", "one"))] == 3
    assert got[("embedserve_images_embedded_total", ("model", "two"))] == 2


def test_the_openapi_body_of_v1_embeddings_names_every_model():
    body = embeddings_body(8, ["a", "b"], [512, 128])
    props = body["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "'a', 'b'" in props["model"]["description"]
    assert props["dimensions"]["enum"] == [128, 512]
    assert embeddings_body(8, "a", 512) == embeddings_body(8, ["a"], [512])
