"""Where the development certificates live (MOEMESH_HOME/certs/), made on first use and reused afterwards:

    ca.pem, ca.key            the development CA (clients trust ca.pem; ca.key never leaves this directory)
    server.pem, server.key    the edge's server certificate (SANs: localhost, 127.0.0.1, ::1 and any asked for)
    mtls/<name>.pem, .key     one certificate per mesh peer for mTLS (server and client usage, SAN <name> too)

A leaf is re-issued when it is missing, expires within a day, or lacks an asked-for SAN; the CA is kept (clients
that trust it keep working). Keys are written 0600, every file atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from moemesh import home
from moemesh.certs.authority import DEFAULT_SANS, Issued, issue, make_ca, still_good

_PEER_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")


@dataclass(frozen=True)
class CertPaths:
    """A leaf certificate, its key, and the CA that signed it."""

    ca: Path
    cert: Path
    key: Path

    def as_dict(self) -> dict[str, str]:
        return {"ca_cert": str(self.ca), "cert": str(self.cert), "key": str(self.key)}


def certs_dir() -> Path:
    return home.subdir("certs")


def _write(path: Path, data: bytes, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _load(cert: Path, key: Path) -> Issued | None:
    try:
        issued = Issued(cert.read_bytes(), key.read_bytes())
        issued.cert  # noqa: B018 (parses: a truncated file counts as missing)
    except (OSError, ValueError):
        return None
    return issued


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One writer at a time: services of a mesh starting together must not each make a CA."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_ca(directory: Path | None = None, *, force: bool = False) -> Issued:
    directory = directory or certs_dir()
    with _locked(directory):
        return _ensure_ca(directory, force)


def _ensure_ca(directory: Path, force: bool) -> Issued:
    ca = None if force else _load(directory / "ca.pem", directory / "ca.key")
    if ca is None or not still_good(ca.cert, (), margin_days=30):
        ca = make_ca()
        _write(directory / "ca.key", ca.key_pem, secret=True)
        _write(directory / "ca.pem", ca.cert_pem, secret=False)
    return ca


def _ensure_leaf(directory: Path, stem: str, common_name: str, sans: tuple[str, ...], *, client: bool,
                 force: bool) -> CertPaths:
    with _locked(directory):
        return _leaf(directory, stem, common_name, sans, client=client, force=force)


def _leaf(directory: Path, stem: str, common_name: str, sans: tuple[str, ...], *, client: bool,
          force: bool) -> CertPaths:
    ca = _ensure_ca(directory, force=False)
    paths = CertPaths(directory / "ca.pem", directory / f"{stem}.pem", directory / f"{stem}.key")
    leaf = None if force else _load(paths.cert, paths.key)
    if leaf is not None and not _signed_by(leaf.cert, ca.cert):
        leaf = None  # the CA was replaced: its old leaves would not verify
    if leaf is None or not still_good(leaf.cert, sans):
        leaf = issue(ca, common_name, sans, server=True, client=client)
        _write(paths.key, leaf.key_pem, secret=True)
        _write(paths.cert, leaf.cert_pem, secret=False)
    return paths


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # wrong issuer, bad signature or an unsupported key type: not ours
        return False
    return True


def ensure_server(extra_sans: tuple[str, ...] = (), directory: Path | None = None, *,
                  force: bool = False) -> CertPaths:
    """The edge's server certificate (localhost, 127.0.0.1, ::1 plus `extra_sans`)."""
    sans = tuple(dict.fromkeys((*DEFAULT_SANS, *extra_sans)))
    return _ensure_leaf(directory or certs_dir(), "server", "moemesh edge", sans, client=False, force=force)


def ensure_peer(name: str, extra_sans: tuple[str, ...] = (), directory: Path | None = None, *,
                force: bool = False) -> CertPaths:
    """An mTLS certificate for mesh peer `name` (e.g. "gateway", "edge"): server and client usage."""
    if not _PEER_NAME.match(name):
        raise ValueError(f"name: {name!r} must be lowercase letters, digits, '.' or '-' (a DNS label)")
    sans = tuple(dict.fromkeys((name, *DEFAULT_SANS, *extra_sans)))
    directory = directory or certs_dir()
    (directory / "mtls").mkdir(parents=True, exist_ok=True)
    return _ensure_leaf(directory, f"mtls/{name}", f"moemesh {name}", sans, client=True, force=force)
