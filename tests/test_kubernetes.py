"""The Kubernetes manifests in docs/kubernetes/: each file one whole object that the Kubernetes
schema accepts (kubernetes-validate, strict: unknown fields are errors), wired to each other and
to the service (probes on BentoML's health routes, settings that embedserve reads).

No cluster runs here: these tests check the objects, not a rollout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from embedserve import index_backend
from embedserve.config import unknown_variables

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the dev extra (make test installs it)"
)

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "kubernetes"
FILES = sorted(FOLDER.glob("*.yaml"))


def _load(path: Path) -> dict:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(documents) == 1, f"{path.name}: one whole object per file, not {len(documents)}"
    return documents[0]


def _objects() -> dict[str, dict]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in map(_load, FILES)}


def test_the_folder_holds_every_object_a_deployment_needs():
    kinds = sorted(o["kind"] for o in _objects().values())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_each_manifest_validates_against_the_kubernetes_schema(path):
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(_load(path), version, strict=True)


def test_the_validator_rejects_a_broken_manifest():
    """The check can fail: a misspelt field and a wrong type are both errors."""
    version = kubernetes_validate.latest_version()
    deployment = _load(FOLDER / "deployment.yaml")
    deployment["spec"]["replica"] = 2  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)
    deployment = _load(FOLDER / "deployment.yaml")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)


def _containers() -> list[dict]:
    return [
        c
        for o in _objects().values()
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    ]


def test_deployments_probe_bentomls_health_routes_and_request_resources():
    for container in _containers():
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["ports"][0]["containerPort"] == 3000  # BentoML's port
        requests = container["resources"]["requests"]
        assert requests["cpu"] and requests["memory"]
    gpu = _objects()["Deployment/embedserve-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "EMBEDSERVE_DEVICE", "value": "cuda"} in gpu["env"]


def test_the_objects_refer_to_each_other():
    objects = _objects()
    for container in _containers():
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {"embedserve"}
        assert "ConfigMap/embedserve" in objects and "Secret/embedserve" in objects
    labels = objects["Deployment/embedserve"]["spec"]["template"]["metadata"]["labels"]
    selector = objects["Service/embedserve"]["spec"]["selector"]
    assert selector.items() <= labels.items()
    gpu_labels = objects["Deployment/embedserve-gpu"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= gpu_labels.items()
    target = objects["HorizontalPodAutoscaler/embedserve"]["spec"]["scaleTargetRef"]
    assert f"{target['kind']}/{target['name']}" in objects
    budget = objects["PodDisruptionBudget/embedserve"]["spec"]["selector"]["matchLabels"]
    assert budget.items() <= labels.items()


def test_every_setting_in_the_manifests_is_one_embedserve_reads():
    objects = _objects()
    names = set(objects["ConfigMap/embedserve"]["data"])
    names |= set(objects["Secret/embedserve"]["stringData"])
    names |= {e["name"] for c in _containers() for e in c.get("env", [])}
    assert names and all(n.startswith("EMBEDSERVE_") for n in names)
    assert unknown_variables(dict.fromkeys(names, "x")) == []


def test_the_replicas_share_a_milvus_index_and_keep_its_token_secret():
    objects = _objects()
    config = objects["ConfigMap/embedserve"]["data"]
    assert index_backend.kind(config["EMBEDSERVE_INDEX"]) == "milvus"  # a server, not a file
    assert "EMBEDSERVE_MILVUS_TOKEN" in objects["Secret/embedserve"]["stringData"]
    assert not any("TOKEN" in n or "KEY" in n for n in config)  # secrets stay in the Secret
