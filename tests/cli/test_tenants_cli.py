"""`moemesh tenants ...` in-process against the Redis of a MOEMESH_HOME (embedded server started per command) or an
explicit --redis-url."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from moemesh.cli.main import main as cli
from services.metering.connection import run_on_redis
from services.metering.errors import Unauthenticated
from services.metering.redis_server import EmbeddedRedis
from services.metering.secret import load_or_create_secret
from services.metering.tenants import TenantStore


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("MOEMESH_METERING_SECRET", raising=False)
    return tmp_path


def _json(capsys, *argv: str) -> dict:
    assert cli(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def _authenticate(key: str, redis_url: str | None = None):
    store = lambda client: TenantStore(client, load_or_create_secret()).authenticate(key)  # noqa: E731
    return run_on_redis(store, redis_url)


def test_create_list_show_and_keys(capsys, home: Path) -> None:
    created = _json(capsys, "tenants", "create", "acme", "--rpm", "60", "--tpm", "20000", "--concurrency", "4",
                    "--budget-usd", "25", "--json")
    assert created["tenant"] == "acme" and created["api_key"].startswith("mm-")
    assert (created["rpm"], created["tpm"], created["concurrency"], created["budget_usd"]) == (60, 20000, 4, 25.0)
    assert _authenticate(created["api_key"]).tenant == "acme"
    assert [t["tenant"] for t in _json(capsys, "tenants", "list", "--json")["tenants"]] == ["acme"]
    added = _json(capsys, "tenants", "add-key", "acme", "--json")
    rotated = _json(capsys, "tenants", "rotate-key", "acme", "--json")
    assert sorted(rotated["revoked_key_ids"]) == sorted([created["key_id"], added["key_id"]])
    with pytest.raises(Unauthenticated):
        _authenticate(added["api_key"])
    _json(capsys, "tenants", "revoke-key", "acme", rotated["key_id"], "--json")
    shown = _json(capsys, "tenants", "show", "acme", "--json")
    assert [k["revoked_unix"] is not None for k in shown["keys"]] == [True, True, True]
    # no server is left behind by the commands
    assert not (home / "redis" / "owner.json").exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(home) in " ".join(p.info["cmdline"] or [])]


def test_set_quota_changes_only_the_given_limits(capsys) -> None:
    _json(capsys, "tenants", "create", "acme", "--rpm", "60", "--json")
    out = _json(capsys, "tenants", "set-quota", "acme", "--budget-usd", "12.5", "--json")
    assert (out["rpm"], out["budget_usd"]) == (60, 12.5)
    out = _json(capsys, "tenants", "set-quota", "acme", "--rpm", "0", "--json")
    assert (out["rpm"], out["budget_usd"]) == (0, 12.5)


def test_errors_are_one_line_and_exit_1(capsys) -> None:
    _json(capsys, "tenants", "create", "acme", "--json")
    assert cli(["tenants", "create", "acme"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["tenants", "create", "Bad Name"]) == 1
    assert "tenant: 'Bad Name'" in capsys.readouterr().err
    assert cli(["tenants", "set-quota", "acme", "--rpm", "-5"]) == 1
    assert "rpm: -5" in capsys.readouterr().err
    assert cli(["tenants", "show", "nobody"]) == 1
    assert "'nobody' does not exist" in capsys.readouterr().err


def test_human_output_shows_the_key_once(capsys) -> None:
    assert cli(["tenants", "create", "acme", "--budget-usd", "5"]) == 0
    out = capsys.readouterr().out
    assert "API key (shown only now" in out and "mm-" in out
    assert cli(["tenants", "list"]) == 0
    listing = capsys.readouterr().out
    assert "acme" in listing and "$5.00" in listing and "mm-" not in listing


def test_redis_url_selects_another_redis(capsys, tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "external") as external:
        created = _json(capsys, "tenants", "create", "ext", "--redis-url", external.url, "--json")
        assert _authenticate(created["api_key"], external.url).tenant == "ext"
        assert _json(capsys, "tenants", "list", "--json") == {"tenants": []}  # MOEMESH_HOME's own Redis
        listed = _json(capsys, "tenants", "list", "--redis-url", external.url, "--json")
        assert [t["tenant"] for t in listed["tenants"]] == ["ext"]
