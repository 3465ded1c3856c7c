"""Entry point of the `moemesh` console script.

Each subcommand lives in moemesh/cli/<name>.py and exposes `register(subparsers)`, which adds its parser and sets
`func` (taking the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["up", "chat", "trace", "tenants", "usage", "convert", "eval", "certs", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemesh", description="Serve Mixture-of-Experts models over a gRPC mesh.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"moemesh.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"moemesh.cli.{name}":
                raise
            continue  # subcommand not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
