"""Entry point of the `moemesh` console script.

Each subcommand lives in moemesh/cli/<name>.py and exposes `register(subparsers)`, which adds its parser and sets
`func` (taking the parsed namespace, returning an exit code).

Only the chosen subcommand's module is imported: `convert` and `eval` pull in torch (about 2 s), which a client
command (`chat`, `usage`, `tenants`, `trace`, `bench`, `top`) must not pay for (benchmarks/cli_startup.py measures it).
Every error ends in one line on stderr: usage errors exit 2, failures 1 (MOEMESH_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> one-line help of `moemesh --help`, which lists them without importing any (a subcommand's module is
# imported only when it is the one run).
SUBCOMMANDS = {
    "up": "run the whole mesh locally (one process per service)",
    "chat": "send one chat message to the mesh",
    "trace": "print a request's span tree from the local trace files",
    "tenants": "create and manage tenants, API keys and quotas",
    "usage": "a tenant's usage, price, cost of goods, margin and satisfaction",
    "top": "live terminal view of the mesh's health and tenants' spend",
    "bench": "load-test the mesh (or the in-process engine)",
    "convert": "turn a dense Llama checkpoint into a Mixture-of-Experts checkpoint",
    "eval": "evaluate a model (perplexity on a text file)",
    "certs": "make the development CA and TLS certificates (MOEMESH_HOME/certs)",
    "quantize": "int4/int8 weight-only quantization of a checkpoint (GPTQ or round-to-nearest)",
    "placement": "expert placement with replicas of the hottest experts, from observed load",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; a person needs the one line naming the flag."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the subcommand `argv` names fully registered; the others are listed by name only."""
    parser = OneLineParser(prog="moemesh", description="Serve Mixture-of-Experts models over a gRPC mesh.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv or () if not a.startswith("-")), None)
    for name, summary in SUBCOMMANDS.items():
        module = _module(name) if name == chosen else None
        if module is not None:
            module.register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _module(name: str):
    try:
        return importlib.import_module(f"moemesh.cli.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"moemesh.cli.{name}":
            raise
        return None  # subcommand not built yet


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    ns = parser.parse_args(argv)
    if not hasattr(ns, "func"):
        parser.error(f"{ns.command}: not available in this build")
    try:
        return int(ns.func(ns) or 0)
    except KeyboardInterrupt:
        print(f"moemesh {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback only on request
        if os.environ.get("MOEMESH_DEBUG"):
            raise
        print(f"moemesh {ns.command}: error: {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(MOEMESH_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
