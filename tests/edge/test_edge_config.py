"""The rendered Envoy config: Envoy itself validates it (local, DNS gateways, mTLS, a descriptor set rebuilt from the
imported modules), the checked-in example is fresh, and bad settings are refused naming the setting."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from moemesh.certs import ensure_peer, ensure_server
from moemesh.edge import EdgeSettings, UpstreamTls, envoy_binary, write
from moemesh.edge.__main__ import example_yaml
from moemesh.edge.descriptor import descriptor_set
from moemesh.protogen import DESCRIPTOR_SET, ROOT

EXAMPLE = ROOT / "deploy" / "envoy" / "envoy.yaml"


def _validate(settings: EdgeSettings, path: Path) -> subprocess.CompletedProcess:
    write(settings, path)
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                           "-l", "warning"], capture_output=True, text=True, timeout=60)


@pytest.fixture
def settings(tmp_path: Path) -> EdgeSettings:
    server = ensure_server(directory=tmp_path / "certs")
    return EdgeSettings(gateways=("127.0.0.1:50051", "127.0.0.1:50061"), cert=str(server.cert), key=str(server.key),
                        descriptor=str(ROOT / DESCRIPTOR_SET), listen_port=0, admin_port=0,
                        access_log=str(tmp_path / "access.log"))


def test_envoy_accepts_the_rendered_config(settings: EdgeSettings, tmp_path: Path) -> None:
    result = _validate(settings, tmp_path / "envoy.json")
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_envoy_accepts_dns_gateways_with_mtls(settings: EdgeSettings, tmp_path: Path) -> None:
    peer = ensure_peer("edge", directory=tmp_path / "certs")
    mtls = replace(settings, gateways=("localhost:50051",),
                   upstream_tls=UpstreamTls(str(peer.ca), str(peer.cert), str(peer.key)))
    result = _validate(mtls, tmp_path / "envoy.json")
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_a_descriptor_set_rebuilt_from_the_modules(settings: EdgeSettings, tmp_path: Path) -> None:
    rebuilt = tmp_path / "moemesh.pb"
    rebuilt.write_bytes(descriptor_set().SerializeToString())
    result = _validate(replace(settings, descriptor=str(rebuilt)), tmp_path / "envoy.json")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_config_is_refused_by_envoy(settings: EdgeSettings, tmp_path: Path) -> None:
    """The validation above can fail: a descriptor without moemesh.v1.Chat is refused."""
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    result = _validate(replace(settings, descriptor=str(empty)), tmp_path / "envoy.json")
    assert result.returncode != 0


def test_the_checked_in_example_is_fresh() -> None:
    assert EXAMPLE.read_text() == example_yaml(), "re-render: python -m moemesh.edge render --example -o " + str(EXAMPLE)


@pytest.mark.parametrize(("change", "message"), [
    ({"gateways": ()}, "gateways: at least one"),
    ({"gateways": ("nohost",)}, "gateways: 'nohost' is not host:port"),
    ({"listen_port": 70000}, "listen_port: 70000"),
    ({"rate_limit_rps": 0}, "rate_limit_rps: 0 must be >= 1"),
    ({"stream_idle_timeout_s": 0.0}, "stream_idle_timeout_s: 0.0 must be > 0"),
])
def test_bad_settings_name_the_setting(settings: EdgeSettings, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        replace(settings, **change)
