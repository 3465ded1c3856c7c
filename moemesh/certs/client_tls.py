"""Client credentials for the Chat API's gRPC port (`moemesh chat`, `ChatClient`, `moemesh bench`): mTLS when the
mesh speaks it, plaintext otherwise.

The gateway listens with mTLS when the mesh runs with MOEMESH_MTLS=1 (moemesh/certs/grpc_tls.py); a client must then
present a certificate of the mesh's CA. Explicit files win (`--ca/--cert/--key`: another mesh's CA, a certificate
issued by an operator); else MOEMESH_MTLS=1 uses the development peer certificate under MOEMESH_HOME/certs (made on
first use, like every mesh service's); else the channel is plaintext, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from moemesh.certs import grpc_tls


@dataclass(frozen=True)
class ClientTls:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--cert/--key: give both (the client certificate and its private key) or neither")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"--{name}: {str(path)!r} is not a file")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None: plaintext (no files given and MOEMESH_MTLS off)."""
        if self.ca or self.cert:
            read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
            return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))
        if grpc_tls.mtls_enabled():
            return grpc_tls.channel_credentials(grpc_tls.client_paths())
        return None

    def channel(self, target: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(target, options=list(options))
        return grpc.secure_channel(target, creds, options=list(options))

    def aio_channel(self, target: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=list(options))
        return grpc.aio.secure_channel(target, creds, options=list(options))
