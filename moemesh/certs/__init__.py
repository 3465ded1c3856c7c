"""Development certificates: a local CA under MOEMESH_HOME/certs/ and the leaves it signs (`moemesh certs`).

- authority.py: make a CA, issue server/client leaves (pure cryptography)
- layout.py: the files under MOEMESH_HOME/certs/, made on first use (`ensure_server`, `ensure_peer`)
- grpc_tls.py: gRPC credentials for mTLS between mesh services (MOEMESH_MTLS)
"""

from moemesh.certs.authority import DEFAULT_SANS, Issued, issue, make_ca, san_values
from moemesh.certs.layout import CertPaths, certs_dir, ensure_ca, ensure_peer, ensure_server

__all__ = ["DEFAULT_SANS", "CertPaths", "Issued", "certs_dir", "ensure_ca", "ensure_peer", "ensure_server", "issue",
           "make_ca", "san_values"]
