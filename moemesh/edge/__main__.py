"""`python -m moemesh.edge render`: an Envoy config for running the edge standalone (or in Kubernetes).

    python -m moemesh.edge render --gateway 10.0.0.5:50051 --gateway 10.0.0.6:50051 \\
        --cert /etc/moemesh/certs/server.pem --key /etc/moemesh/certs/server.key -o envoy.yaml
    envoy -c envoy.yaml
    python -m moemesh.edge render --example -o deploy/envoy/envoy.yaml     # the checked-in example
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moemesh.edge.config import render
from moemesh.edge.settings import EdgeSettings, UpstreamTls

# The checked-in example (deploy/envoy/envoy.yaml): Kubernetes paths and names (see deploy/envoy/README.md).
EXAMPLE = EdgeSettings(
    gateways=("moemesh-gateway:50051",), cert="/etc/moemesh/certs/server.pem",
    key="/etc/moemesh/certs/server.key", descriptor="/etc/moemesh/envoy/moemesh.pb", listen_host="0.0.0.0",
    listen_port=8443, admin_host="127.0.0.1", admin_port=9901, access_log="/dev/stdout", health_interval_s=5.0,
)
HEADER = ("# Envoy edge of moemesh, rendered by `python -m moemesh.edge render --example` (do not edit: change\n"
          "# moemesh/edge/ and re-render; tests/edge/test_edge_config.py fails when this file is stale).\n")


def to_yaml(config: dict) -> str:
    """YAML with multi-line strings (the Lua script) as literal blocks; JSON when PyYAML is not installed."""
    try:
        import yaml
    except ImportError:
        return json.dumps(config, indent=1) + "\n"

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(config, Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True)


def example_yaml() -> str:
    return HEADER + to_yaml(render(EXAMPLE))


def _settings(ns: argparse.Namespace) -> EdgeSettings:
    host, _, port = ns.listen.rpartition(":")
    upstream = UpstreamTls(ns.mtls_ca, ns.mtls_cert, ns.mtls_key) if ns.mtls_ca else None
    return EdgeSettings(gateways=tuple(ns.gateway), cert=ns.cert, key=ns.key, descriptor=ns.descriptor,
                        listen_host=host or "0.0.0.0", listen_port=int(port), admin_port=ns.admin_port,
                        access_log=ns.access_log, upstream_tls=upstream, rate_limit_rps=ns.rps,
                        rate_limit_burst=2 * ns.rps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moemesh.edge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="print (or write) an Envoy config")
    p.add_argument("--example", action="store_true", help="the checked-in Kubernetes example")
    p.add_argument("--gateway", action="append", default=[], help="gateway host:port (repeatable)")
    p.add_argument("--cert", default="/etc/moemesh/certs/server.pem")
    p.add_argument("--key", default="/etc/moemesh/certs/server.key")
    p.add_argument("--descriptor", default=str(Path("deploy/envoy/moemesh.pb").resolve()))
    p.add_argument("--listen", default="0.0.0.0:8443")
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--access-log", default="/dev/stdout")
    p.add_argument("--rps", type=int, default=200, help="local rate limit, requests per second")
    p.add_argument("--mtls-ca", help="with --mtls-cert/--mtls-key: mTLS to the gateways")
    p.add_argument("--mtls-cert")
    p.add_argument("--mtls-key")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    ns = parser.parse_args(argv)
    try:
        text = example_yaml() if ns.example else to_yaml(render(_settings(ns)))
    except ValueError as exc:
        print(f"moemesh.edge render: {exc}", file=sys.stderr)
        return 2
    if ns.output:
        ns.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
