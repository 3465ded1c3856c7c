"""Generate moemesh/v1/*_pb2*.py (and the Envoy descriptor set) from protos/moemesh/v1/*.proto.

`make protos` runs this. The output is committed; tests/test_protos_fresh.py regenerates into a temporary folder and
fails when the committed files differ, so a contract change can never ship with stale code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DESCRIPTOR_SET = Path("deploy/envoy/moemesh.pb")


def _include_dirs() -> list[Path]:
    """protos/, grpc_tools' well-known types, and googleapis-common-protos (google/api/*.proto)."""
    import google.api.annotations_pb2 as annotations

    google_root = Path(annotations.__file__).resolve().parent.parent.parent
    return [PROTO_ROOT, Path(grpc_tools.__file__).parent / "_proto", google_root]


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "moemesh" / "v1").glob("*.proto"))


def generate(out_dir: Path, descriptor_out: Path | None) -> None:
    """Writes moemesh/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_dir (and the descriptor set)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["grpc_tools.protoc", *(f"-I{d}" for d in _include_dirs())]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if descriptor_out is not None:
        descriptor_out.parent.mkdir(parents=True, exist_ok=True)
        args += [f"--descriptor_set_out={descriptor_out}", "--include_imports", "--include_source_info"]
    rc = protoc.main(args + files)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc} on {files}")
    package = out_dir / "moemesh" / "v1"
    (package / "__init__.py").write_text('"""Generated from protos/moemesh/v1 by `make protos`; do not edit."""\n')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root under which moemesh/v1/ is written")
    parser.add_argument("--descriptor-set", type=Path, default=ROOT / DESCRIPTOR_SET)
    ns = parser.parse_args(argv)
    generate(ns.out, ns.descriptor_set)
    print(f"generated {len(proto_files())} protos into {ns.out / 'moemesh' / 'v1'}", file=sys.stderr)


if __name__ == "__main__":
    main()
