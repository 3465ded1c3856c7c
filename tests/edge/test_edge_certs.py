"""`moemesh certs`: the development CA and its leaves (SANs, usages, reuse, re-issue, file modes, errors)."""

from __future__ import annotations

import argparse
import json
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from moemesh.certs import ensure_ca, ensure_peer, ensure_server, san_values
from moemesh.certs.authority import issue, make_ca
from moemesh.cli import certs as certs_cli


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _usages(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_server_certificate_covers_localhost_and_verifies_against_the_ca(tmp_path: Path) -> None:
    paths = ensure_server(("edge.example.internal",), directory=tmp_path)
    cert = _cert(paths.cert)
    assert san_values(cert) == {"localhost", "127.0.0.1", "::1", "edge.example.internal"}
    cert.verify_directly_issued_by(_cert(paths.ca))
    assert _usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    ssl.create_default_context(cafile=str(paths.ca))  # what clients do with ca.pem: it must load
    assert (paths.key.stat().st_mode & 0o777) == 0o600 and ((tmp_path / "ca.key").stat().st_mode & 0o777) == 0o600


def test_certificates_are_reused_and_reissued_when_a_san_is_missing(tmp_path: Path) -> None:
    first = ensure_server(directory=tmp_path).cert.read_bytes()
    assert ensure_server(directory=tmp_path).cert.read_bytes() == first
    ca_before = (tmp_path / "ca.pem").read_bytes()
    wider = ensure_server(("10.1.2.3",), directory=tmp_path).cert.read_bytes()
    assert wider != first and (tmp_path / "ca.pem").read_bytes() == ca_before
    assert "10.1.2.3" in san_values(x509.load_pem_x509_certificate(wider))


def test_a_new_ca_reissues_its_leaves(tmp_path: Path) -> None:
    old_leaf = ensure_server(directory=tmp_path).cert.read_bytes()
    ensure_ca(tmp_path, force=True)
    again = ensure_server(directory=tmp_path)
    _cert(again.cert).verify_directly_issued_by(_cert(again.ca))  # raises when the leaf is the old CA's
    assert again.cert.read_bytes() != old_leaf


def test_peer_certificates_serve_and_authenticate(tmp_path: Path) -> None:
    paths = ensure_peer("gateway", directory=tmp_path)
    cert = _cert(paths.cert)
    assert "gateway" in san_values(cert) and "127.0.0.1" in san_values(cert)
    assert _usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    with pytest.raises(ValueError, match="name: 'Not A Name'"):
        ensure_peer("Not A Name", directory=tmp_path)


def test_bad_requests_name_what_is_wrong() -> None:
    ca = make_ca()
    with pytest.raises(ValueError, match="san: 'bad name'"):
        issue(ca, "x", ("bad name",))
    with pytest.raises(ValueError, match="server certificate needs at least one"):
        issue(ca, "x", ())
    with pytest.raises(ValueError, match="usage"):
        issue(ca, "x", ("localhost",), server=False, client=False)


def main(argv: list[str]) -> int:
    """`moemesh <argv>` with only the certs subcommand registered (the others import torch: slow)."""
    parser = argparse.ArgumentParser(prog="moemesh")
    certs_cli.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return ns.func(ns)


def test_the_cli_prints_the_paths(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    assert main(["certs", "--json", "--mtls", "gateway", "edge"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ca_cert"] == str(tmp_path / "certs" / "ca.pem") and info["sans"] == ["127.0.0.1", "::1", "localhost"]
    assert set(info["mtls"]) == {"gateway", "edge"} and Path(info["mtls"]["edge"]["cert"]).is_file()
    assert main(["certs", "--san", "a b"]) == 1
    assert "san: 'a b'" in capsys.readouterr().err
