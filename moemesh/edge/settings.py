"""What the Envoy edge is configured with: one frozen value, validated with errors that name the bad setting."""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1024 * 1024


@dataclass(frozen=True)
class UpstreamTls:
    """mTLS from Envoy to the gateways: trust `ca`, present `cert`/`key` (moemesh certs --mtls edge)."""

    ca: str
    cert: str
    key: str
    server_name: str = "gateway"  # SNI and the SAN the gateway's certificate must carry


@dataclass(frozen=True)
class EdgeSettings:
    gateways: tuple[str, ...]  # host:port of each gateway replica (an IP: STATIC, a name: STRICT_DNS)
    cert: str  # the edge's server certificate chain (PEM path)
    key: str  # its private key
    descriptor: str  # FileDescriptorSet of moemesh.v1 (deploy/envoy/moemesh.pb, `make protos`)
    listen_host: str = "127.0.0.1"
    listen_port: int = 8443  # 0: any free port (read it back from the admin API)
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    access_log: str = "/dev/stdout"
    upstream_tls: UpstreamTls | None = None
    rate_limit_rps: int = 200  # local token bucket shared by every connection of one Envoy
    rate_limit_burst: int = 400
    request_timeout_s: float = 310.0  # unary calls; a little over the gateway's own 300 s deadline
    stream_idle_timeout_s: float = 120.0  # streams: no route timeout, but at most this long without a byte
    max_body_bytes: int = 8 * MiB  # request bodies (long prompts), buffers and gRPC messages
    health_interval_s: float = 2.0
    max_connections: int = 10_000
    extra_sans: tuple[str, ...] = field(default=())  # informational: what the certificate was made for

    def __post_init__(self) -> None:
        if not self.gateways:
            raise ValueError("gateways: at least one gateway address (host:port) is needed")
        for address in self.gateways:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"gateways: {address!r} is not host:port")
        for name in ("listen_port", "admin_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                raise ValueError(f"{name}: {value} is not a port (0-65535)")
        for name in ("rate_limit_rps", "rate_limit_burst", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1")
        for name in ("request_timeout_s", "stream_idle_timeout_s", "health_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be > 0")
