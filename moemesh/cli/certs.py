"""`moemesh certs` (= `make certs`): the development CA and certificates under MOEMESH_HOME/certs/.

Makes the CA and the edge's server certificate (SANs localhost, 127.0.0.1, ::1, plus --san ...) on first use and
reuses them afterwards; --force makes new ones (a new CA too: clients must trust the new ca.pem). --mtls NAME ...
also issues one certificate per mesh peer for mTLS between services (MOEMESH_MTLS=1).

    moemesh certs                       # ca.pem, server.pem, server.key
    moemesh certs --san edge.example.internal --mtls gateway edge
    curl --cacert ~/.moemesh/certs/ca.pem https://127.0.0.1:8443/healthz
"""

from __future__ import annotations

import argparse
import json
import sys

from moemesh.certs import certs_dir, ensure_ca, ensure_peer, ensure_server, san_values


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("certs", help="make the development CA and TLS certificates (MOEMESH_HOME/certs)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="extra subject alternative name of the server certificate (repeatable)")
    p.add_argument("--mtls", nargs="+", default=[], metavar="PEER",
                   help="also issue mTLS certificates for these mesh peers (e.g. gateway edge)")
    p.add_argument("--force", action="store_true", help="make a new CA and new certificates")
    p.add_argument("--json", action="store_true", help="print the paths as JSON")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    try:
        if ns.force:
            ensure_ca(force=True)
        server = ensure_server(tuple(ns.san), force=ns.force)
        peers = {name: ensure_peer(name, force=ns.force) for name in ns.mtls}
    except (ValueError, OSError) as exc:
        print(f"moemesh certs: {exc}", file=sys.stderr)
        return 1
    out = {"dir": str(certs_dir()), **server.as_dict(),
           "sans": sorted(san_values(_cert(server.cert))), "mtls": {n: p.as_dict() for n, p in peers.items()}}
    if ns.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"development CA:      {out['ca_cert']}  (trust this one)")
    print(f"server certificate:  {out['cert']}  (SANs: {', '.join(out['sans'])})")
    print(f"server key:          {out['key']}")
    for name, paths in out["mtls"].items():
        print(f"mTLS {name + ':':<15} {paths['cert']}")
    return 0


def _cert(path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())
