"""deploy/k8s: every manifest validates against the Kubernetes schemas, every workload is probed and non-root, and
every peer address (*_ADDR, *_ADDRS, REDIS_URL) names a Service (and port) defined in the manifests. The checks run
on the base's files and on what `kubectl kustomize` renders for deploy/k8s (base + edge) and overlays/gpu."""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from kubernetes_validate import utils as kv

from moemesh.serving.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE = ROOT / "base"
# Native gRPC probes are GA since 1.27, the pod-index label (expert shard index) since 1.28 (beta, on by default).
K8S_VERSIONS = ("1.30", kv.latest_version())
WORKLOADS = ("Deployment", "StatefulSet")
MOEMESH_IMAGE = "ghcr.io/moemesh/moemesh"
SOURCES = ("base", ".", "overlays/gpu")  # base's files; the kustomizations deploy/k8s and deploy/k8s/overlays/gpu


def load_docs(paths: list[Path]) -> list[dict]:
    docs = []
    for path in paths:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def base_docs() -> list[dict]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return load_docs([BASE / name for name in kustomization["resources"]])


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    assert shutil.which("kubectl"), "rendering the kustomizations needs kubectl (Debian package kubectl)"
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def rendered(target: str) -> list[dict]:
    """`kubectl kustomize deploy/k8s/<target>` as documents (a fresh copy: tests may edit it)."""
    return copy.deepcopy(list(_render(target)))


def docs_of(source: str) -> list[dict]:
    return base_docs() if source == "base" else rendered(source)


def workload(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d["kind"] in WORKLOADS and d["metadata"]["name"] == name)


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def address_problems(docs: list[dict]) -> list[str]:
    """Every *_ADDR / *_ADDRS host:port and REDIS_URL must name a Service here (or a StatefulSet pod behind its
    headless Service) and one of that Service's ports."""
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    statefulsets = {d["spec"]["serviceName"]: d for d in docs if d["kind"] == "StatefulSet"}
    problems: list[str] = []
    for doc in (d for d in docs if d["kind"] in WORKLOADS):
        for container in containers(doc):
            for name, value in env_of(container).items():
                if name.endswith(("_ADDR", "_ADDRS")):
                    targets = [v.strip() for v in value.split(",") if v.strip()]
                elif name == "REDIS_URL":
                    url = urlparse(value)
                    targets = [f"{url.hostname}:{url.port or 6379}"]
                else:
                    continue
                if not targets:
                    problems.append(f"{doc['metadata']['name']}: {name} is empty")
                for target in targets:
                    problem = _check_target(target, services, statefulsets)
                    if problem:
                        problems.append(f"{doc['metadata']['name']}: {name}={value!r}: {problem}")
    return problems


def _check_target(target: str, services: dict, statefulsets: dict) -> str | None:
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        return f"{target!r} is not host:port"
    labels = host.removesuffix(".svc.cluster.local").split(".")
    pod = None
    if len(labels) >= 2 and labels[0] not in services:  # <pod>.<service>[.<namespace>]
        pod, labels = labels[0], labels[1:]
    service = services.get(labels[0])
    if service is None:
        return f"no Service named {labels[0]!r}"
    if int(port) not in [p["port"] for p in service["spec"]["ports"]]:
        return f"Service {labels[0]!r} has no port {port}"
    if pod is not None:
        sts = statefulsets.get(labels[0])
        if sts is None or service["spec"].get("clusterIP") != "None":
            return f"{pod!r}.{labels[0]!r} needs a headless Service of a StatefulSet"
        ordinal = pod.removeprefix(sts["metadata"]["name"] + "-")
        if not ordinal.isdigit() or int(ordinal) >= sts["spec"]["replicas"]:
            return f"pod {pod!r} is not one of {sts['metadata']['name']}-0..{sts['spec']['replicas'] - 1}"
    return None


@pytest.mark.parametrize("directory", ["base", "edge", "overlays/gpu"])
def test_kustomization_lists_every_manifest(directory):
    kustomization = yaml.safe_load((ROOT / directory / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", [])) | {p["path"] for p in kustomization.get("patches", [])}
    on_disk = {p.name for p in (ROOT / directory).glob("*.yaml")} - {"kustomization.yaml"}
    assert {name for name in listed if not name.startswith("..")} == on_disk  # ../: other kustomizations


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_strictly(version):
    docs = base_docs()
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Namespace"} <= {d["kind"] for d in docs}
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc.message} at "
                        f"{'/'.join(map(str, exc.absolute_path))}")


@pytest.mark.parametrize("source", SOURCES)
def test_each_service_has_a_workload_and_probes(source):
    docs = docs_of(source)
    workloads = {d["metadata"]["name"]: d for d in docs if d["kind"] in WORKLOADS}
    expected = {f"moemesh-{n}" for n in ("tokenizer", "batcher", "router", "expert", "metering", "gateway", "redis")}
    assert expected <= set(workloads)
    for name, doc in workloads.items():
        for c in containers(doc):
            assert "readinessProbe" in c and "livenessProbe" in c, f"{name}/{c['name']} lacks probes"
            if c["image"].startswith(MOEMESH_IMAGE):
                grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"]["port"] == grpc_port, f"{name}/{c['name']} {probe}"
                service = doc["metadata"]["name"].removeprefix("moemesh-").upper()
                assert env_of(c)[f"MOEMESH_{service}_PORT"] == str(grpc_port), name


@pytest.mark.parametrize("source", SOURCES)
def test_every_workload_is_non_root_and_locked_down(source):
    for doc in (d for d in docs_of(source) if d["kind"] in WORKLOADS):
        pod = doc["spec"]["template"]["spec"]
        name = doc["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod.get("automountServiceAccountToken") is False, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], name


@pytest.mark.parametrize("source", SOURCES)
def test_every_peer_address_points_at_a_service(source):
    docs = docs_of(source)
    assert address_problems(docs) == []
    addressed = {e for d in docs if d["kind"] in WORKLOADS for c in containers(d) for e in env_of(c)
                 if e.endswith(("_ADDR", "_ADDRS"))}
    assert {"ROUTER_ADDR", "EXPERT_ADDRS", "TOKENIZER_ADDR", "BATCHER_ADDR", "METERING_ADDR"} <= addressed


def test_address_check_catches_a_wrong_address():
    docs = base_docs()
    router = next(d for d in docs if d["metadata"]["name"] == "moemesh-router" and d["kind"] == "Deployment")
    for e in containers(router)[0]["env"]:
        if e["name"] == "EXPERT_ADDRS":
            e["value"] += ",moemesh-expert-2.moemesh-expert:50055,moemesh-routr:50054"
    problems = address_problems(docs)
    assert len(problems) == 2 and "moemesh-expert-2" in problems[0] and "moemesh-routr" in problems[1]


def test_expert_shards_match_router_addresses():
    docs = base_docs()
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "moemesh-expert")
    router = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "moemesh-router")
    shards = int(env_of(containers(sts)[0])["MOEMESH_EXPERT_NUM_SHARDS"])
    addrs = env_of(containers(router)[0])["EXPERT_ADDRS"].split(",")
    assert shards == sts["spec"]["replicas"] == len(addrs)
    assert addrs == [f"moemesh-expert-{i}.moemesh-expert:50055" for i in range(shards)]  # shard order


def test_services_select_their_workloads():
    docs = base_docs()
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in WORKLOADS]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), svc["metadata"]["name"]


def extra_env(component: str) -> set[str]:
    """Service env read outside the config class."""
    if component == "metering":
        from services.metering.secret import SECRET_ENV

        return {SECRET_ENV}
    return set()


def config_class(component: str) -> type[ServiceConfig]:
    module = importlib.import_module("gateway.config" if component == "gateway" else f"services.{component}.config")
    return next(v for v in vars(module).values()
                if isinstance(v, type) and issubclass(v, ServiceConfig) and v.SERVICE == component)


@pytest.mark.parametrize("source", SOURCES)
def test_every_service_setting_in_the_manifests_is_read_by_its_config(source):
    """MOEMESH_<SERVICE>_*, *_ADDR(S) and REDIS_URL set on a pod must be settings of that service's config class."""
    for doc in (d for d in docs_of(source) if d["kind"] in WORKLOADS):
        for c in containers(doc):
            if not c["image"].startswith(MOEMESH_IMAGE):
                continue
            component = doc["metadata"]["name"].removeprefix("moemesh-")
            cls = config_class(component)
            known = {cls.env_name(f.name) for f in dataclasses.fields(cls)} | extra_env(component)
            prefix = f"MOEMESH_{component.upper()}_"
            for e in c.get("env", []):
                name = e["name"]
                if name.startswith(prefix) or name.endswith(("_ADDR", "_ADDRS")) or name == "REDIS_URL":
                    assert name in known, f"{doc['metadata']['name']}: {name} is no setting of {cls.__name__}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", [".", "overlays/gpu"])
def test_kustomize_output_validates(target, version):
    docs = rendered(target)
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= {d["kind"] for d in docs}
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc.message} at "
                        f"{'/'.join(map(str, exc.absolute_path))}")
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "moemesh"
