"""deploy/k8s/overlays/gpu, rendered: one expert shard per GPU, the router on its own GPU with every shard in one NCCL
group (--expert-transport dist), both ends with the same dtype, NCCL env and a memory-backed /dev/shm, the router's
EXPERT_ADDRS exactly the shard pods behind their headless Service, and the probes of the base unchanged."""

from __future__ import annotations

import pytest

from services.expert.config import ExpertConfig
from services.router.config import RouterConfig

from .test_manifests import WORKLOADS, base_docs, containers, env_of, rendered, workload

GPU = "nvidia.com/gpu"


def _gpu() -> tuple[list[dict], dict, dict]:
    docs = rendered("overlays/gpu")
    return docs, workload(docs, "moemesh-expert"), workload(docs, "moemesh-router")


def _config(cls, docs: list[dict], doc: dict):
    """The service's config as the pod would read it: the ConfigMap it imports, then its own env (the shard index
    comes from the pod-index label at run time: shard 0 here)."""
    c = containers(doc)[0]
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(next(d for d in docs if d["kind"] == "ConfigMap" and
                        d["metadata"]["name"] == source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e.get("value", "0") for e in c["env"]})
    return cls.from_args([], env=env)


def test_one_gpu_per_shard_and_one_for_the_router():
    docs, sts, router = _gpu()
    for doc in (sts, router):
        resources = containers(doc)[0]["resources"]
        assert resources["limits"][GPU] == resources["requests"][GPU] == 1, doc["metadata"]["name"]
    shards = _config(ExpertConfig, docs, sts).num_shards
    assert sts["spec"]["replicas"] == shards == len(_config(RouterConfig, docs, router).expert_addrs)
    others = [d["metadata"]["name"] for d in docs if d["kind"] in WORKLOADS and d not in (sts, router)
              and any(GPU in c["resources"].get("limits", {}) for c in containers(d))]
    assert others == []


def test_router_and_shards_form_one_nccl_group():
    docs, sts, router = _gpu()
    r, e = _config(RouterConfig, docs, router), _config(ExpertConfig, docs, sts)
    assert r.expert_transport == "dist"  # refuses to start rather than fall back to gRPC bytes
    assert r.device.startswith("cuda") and e.device.startswith("cuda")  # both on CUDA: backend nccl (link_choice)
    assert r.dtype == e.dtype == "bfloat16"  # JoinGroup refuses a shard of another dtype
    assert r.model == e.model


@pytest.mark.parametrize("name", ["moemesh-router", "moemesh-expert"])
def test_nccl_env_and_shared_memory(name):
    docs, sts, router = _gpu()
    doc = workload(docs, name)
    env = env_of(containers(doc)[0])
    assert env["NCCL_DEBUG"] == "WARN"
    assert env["NCCL_SOCKET_IFNAME"] == env_of(containers(sts)[0])["NCCL_SOCKET_IFNAME"] == \
        env_of(containers(router)[0])["NCCL_SOCKET_IFNAME"]
    mount = next(m for m in containers(doc)[0]["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in doc["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]


def test_expert_addrs_are_the_shard_pods_behind_their_headless_service():
    docs, sts, router = _gpu()
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # per-pod DNS records, no balancing across different shards
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    name, svc = sts["metadata"]["name"], service["metadata"]["name"]
    expected = tuple(f"{name}-{i}.{svc}:{port}" for i in range(sts["spec"]["replicas"]))
    assert _config(RouterConfig, docs, router).expert_addrs == expected  # shard order = pod ordinal


def test_probes_are_the_base_ones():
    gpu = rendered("overlays/gpu")
    for base in (d for d in base_docs() if d["kind"] in WORKLOADS):
        ours = workload(gpu, base["metadata"]["name"])
        for want, got in zip(containers(base), containers(ours)):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert got.get(probe) == want.get(probe), f"{base['metadata']['name']} {probe}"
