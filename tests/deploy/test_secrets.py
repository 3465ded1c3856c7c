"""deploy/k8s secrets: every service whose code reads a shared secret from the environment (the admin token, the
API-key HMAC secret) gets it from a Kubernetes Secret, the same Secret key on every replica, never a literal value.
Which services read them is found in the code, so a service that starts checking the token needs its manifest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.metering.admin import ADMIN_ENV
from services.metering.secret import SECRET_ENV

from .test_manifests import SOURCES, WORKLOADS, containers, docs_of

ROOT = Path(__file__).resolve().parents[2]
# env name -> what a service's code calls to read it (besides the name itself)
READERS = {ADMIN_ENV: "load_or_create_admin_token(", SECRET_ENV: "load_or_create_secret("}


def components_reading(env: str) -> set[str]:
    """Deployed components (services/<name>, gateway) whose code reads `env`: the name or its loader's call."""
    found = set()
    packages = [p for p in (ROOT / "services").iterdir() if p.is_dir()] + [ROOT / "gateway"]
    for package in packages:
        for path in package.rglob("*.py"):
            text = path.read_text()
            calls = re.findall(re.escape(READERS[env]), text)
            if env in text or len(calls) > text.count(f"def {READERS[env]}"):
                found.add(package.name)
    return found


def secret_refs(source: str, env: str) -> dict[str, dict | None]:
    """Workload name -> the env var's secretKeyRef (None when it is set another way), for workloads that set it."""
    refs = {}
    for doc in (d for d in docs_of(source) if d["kind"] in WORKLOADS):
        for c in containers(doc):
            for e in c.get("env", []):
                if e["name"] == env:
                    refs[doc["metadata"]["name"]] = e.get("valueFrom", {}).get("secretKeyRef")
    return refs


def test_the_admin_token_is_read_by_metering():
    assert "metering" in components_reading(ADMIN_ENV)  # the scan finds the reader the manifests must serve


@pytest.mark.parametrize("env", sorted(READERS))
@pytest.mark.parametrize("source", SOURCES)
def test_every_reader_of_a_secret_gets_it_from_one_secret(source, env):
    refs = secret_refs(source, env)
    for component in components_reading(env):
        name = f"moemesh-{component}"
        assert name in refs, f"{name} reads {env} but its manifest does not set it (each replica would differ)"
    assert all(refs.values()), f"{env} set without a secretKeyRef: {refs}"
    assert len({(r["name"], r["key"]) for r in refs.values()}) <= 1, f"{env} from different Secrets: {refs}"
    assert not any(r.get("optional") for r in refs.values()), f"{env}: an optional Secret would start pods without it"
