"""deploy/: every kustomize overlay renders and validates offline against the
Kubernetes schemas; the Dockerfiles pass hadolint and keep their invariants."""

from __future__ import annotations

import pathlib
import re
import subprocess
import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pt2serve.service.config import load_config
from tests.conftest import require_tool

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]
K8S_VERSION = "1.30"
CRDS = {"ServiceMonitor", "PrometheusRule"}


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [require_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    expected = {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler", *CRDS}
    assert expected <= kinds
    for doc in docs:
        if doc["kind"] in CRDS:
            continue  # no schema offline; checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_drain_and_security(overlay: str, tmp_path: pathlib.Path) -> None:
    docs = render(overlay)
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    probes = {k: container[k]["grpc"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert all(p["port"] == grpc_port for p in probes.values())
    assert (
        probes["readinessProbe"]["service"] == "readiness"
        and probes["livenessProbe"]["service"] == "liveness"
    )
    # The drain delay is the server's own (service/shutdown.py), not a preStop sleep.
    assert "lifecycle" not in container
    (configmap,) = by_kind(docs, "ConfigMap")
    (tmp_path / "config.toml").write_text(configmap["data"]["config.toml"])
    config = load_config(tmp_path / "config.toml")  # the server accepts the shipped config
    assert config.grpc_port == grpc_port and config.max_connection_age_s > 0
    assert config.drain_delay_s >= 5
    assert pod["terminationGracePeriodSeconds"] > config.drain_delay_s + config.drain_grace_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True and mounts["tmp"]["mountPath"] == "/tmp"
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert all(m.device_indices == (0,) for m in config.models)
        assert container["image"].endswith(":cuda")
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert container["image"].endswith(":cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_hpa_and_monitoring(overlay: str) -> None:
    docs = render(overlay)
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert services["pt2serve-headless"]["spec"]["clusterIP"] == "None"
    assert services["pt2serve"]["spec"]["type"] == "ClusterIP"
    (monitor,) = by_kind(docs, "ServiceMonitor")
    port_names = {p["name"] for p in services["pt2serve"]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())
    assert metric in {rule["name"]["as"] for rule in adapter["rules"]}
    (rule,) = by_kind(docs, "PrometheusRule")
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "pt2serve-rules.yml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    (deployment,) = by_kind(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# ------------------------------------------------------------------ Docker
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))


def stages(dockerfile: pathlib.Path) -> list[str]:
    return re.split(r"(?m)^FROM ", dockerfile.read_text())[1:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: pathlib.Path) -> None:
    result = subprocess.run([require_tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_invariants(dockerfile: pathlib.Path) -> None:
    parts = stages(dockerfile)
    assert len(parts) >= 2, "multi-stage: build tools stay out of the runtime image"
    runtime = parts[-1]
    assert re.search(r"(?m)^USER 10001", runtime), "runtime runs as a non-root user"
    assert not re.search(r"build-essential|gcc|g\+\+|pip install", runtime), (
        "no build tools in the runtime stage"
    )
    assert 'VOLUME ["/models"]' in runtime
    assert "torch==2.13.0" in parts[0], "torch pinned"


def test_dockerignore_keeps_the_context_small() -> None:
    text = (ROOT / ".dockerignore").read_text().splitlines()
    assert text[text.index("*") + 1 :][:1], "ignore everything, then allow what the image needs"
    allowed = {line[1:].rstrip("/") for line in text if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "service", "scheduler", "loader"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert folders <= allowed
