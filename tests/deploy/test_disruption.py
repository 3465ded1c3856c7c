"""deploy/k8s reliability: every workload has a PodDisruptionBudget that keeps replicated tiers serving and never
blocks a node drain, and the liveness probes restart a dead or stalled pod as `moemesh up` restarts a service."""

from __future__ import annotations

import pytest

from moemesh.cli.supervision import RestartPolicy

from .test_manifests import MOEMESH_IMAGE, SOURCES, WORKLOADS, containers, docs_of


def _budgets(source: str) -> tuple[dict[str, dict], dict[str, dict]]:
    docs = docs_of(source)
    return ({d["metadata"]["name"]: d for d in docs if d["kind"] in WORKLOADS},
            {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"})


@pytest.mark.parametrize("source", SOURCES)
def test_every_workload_has_a_budget_that_selects_it(source: str) -> None:
    workloads, budgets = _budgets(source)
    assert set(budgets) == set(workloads)
    for name, pdb in budgets.items():
        pod_labels = workloads[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), name
        others = [w for w, d in workloads.items() if w != name and
                  pdb["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert others == [], f"{name}'s budget also selects {others}"


@pytest.mark.parametrize("source", SOURCES)
def test_replicated_tiers_keep_a_pod_and_no_budget_blocks_a_drain(source: str) -> None:
    workloads, budgets = _budgets(source)
    for name, pdb in budgets.items():
        replicas, spec = workloads[name]["spec"]["replicas"], pdb["spec"]
        allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
        assert allowed >= 1, f"{name}: a budget of 0 disruptions blocks every node drain"
        if replicas > 1 and name != "moemesh-expert":  # expert shards are not replicas of each other
            assert replicas - allowed >= 1, f"{name}: a drain could take every replica at once"


@pytest.mark.parametrize("source", SOURCES)
def test_liveness_restarts_a_stalled_pod_as_moemesh_up_does(source: str) -> None:
    policy = RestartPolicy()
    workloads, _ = _budgets(source)
    for name, doc in workloads.items():
        for c in containers(doc):
            if not c["image"].startswith(MOEMESH_IMAGE):
                continue
            live, ready = c["livenessProbe"], c["readinessProbe"]
            assert live["periodSeconds"] * live["failureThreshold"] == policy.health_interval_s * policy.health_failures
            assert live["timeoutSeconds"] >= 2 and ready["timeoutSeconds"] >= 2, name  # 1 s: flaky on busy cores
