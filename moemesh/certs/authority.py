"""A development certificate authority: one self-signed CA, and leaf certificates it signs for servers (the edge,
mesh services under mTLS) and clients (mTLS peers). EC P-256 keys: fast to make, accepted by Envoy's BoringSSL,
gRPC and Python's ssl. Pure cryptography, no files (layout.py decides where they go).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 397  # what browsers accept for a leaf
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moemesh development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def san_entry(value: str) -> x509.GeneralName:
    """"127.0.0.1" / "::1" -> an IP SAN, anything else a DNS SAN (ValueError naming a bad one)."""
    value = value.strip()
    if not value:
        raise ValueError("san: empty subject alternative name")
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if any(c.isspace() for c in value) or "/" in value:
        raise ValueError(f"san: {value!r} is neither an IP address nor a DNS name")
    return x509.DNSName(value)


def san_values(cert: x509.Certificate) -> set[str]:
    """The certificate's SANs as strings ("localhost", "127.0.0.1")."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)}


def make_ca(common_name: str = "moemesh development CA", days: int = CA_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(ca: Issued, common_name: str, sans: tuple[str, ...], *, server: bool = True, client: bool = False,
          days: int = LEAF_DAYS) -> Issued:
    """A leaf signed by `ca` for `sans` (server and/or client authentication)."""
    if not (server or client):
        raise ValueError("usage: a certificate must be for a server, a client, or both")
    if server and not sans:
        raise ValueError("san: a server certificate needs at least one subject alternative name")
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([san_entry(s) for s in sans]), critical=False)
    return Issued(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _key_pem(key))


def still_good(cert: x509.Certificate, sans: tuple[str, ...], margin_days: float = 1.0) -> bool:
    """True when `cert` covers every SAN in `sans` and stays valid for at least `margin_days`."""
    normalized = {str(san_entry(s).value) for s in sans}
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    return normalized <= san_values(cert) and left > dt.timedelta(days=margin_days)
