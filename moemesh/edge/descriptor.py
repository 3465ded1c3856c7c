"""The FileDescriptorSet the transcoder needs: deploy/envoy/moemesh.pb from `make protos` in a checkout; elsewhere
(an installed wheel) the same set rebuilt from the moemesh.v1 modules this process imports, with their imports."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from moemesh.protogen import DESCRIPTOR_SET, ROOT
from moemesh.v1 import chat_pb2


def descriptor_set(root: FileDescriptor = chat_pb2.DESCRIPTOR) -> descriptor_pb2.FileDescriptorSet:
    """`root` and everything it imports, dependencies first (what protoc --include_imports writes)."""
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def visit(fd: FileDescriptor) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            visit(dep)
        fd.CopyToProto(out.file.add())

    visit(root)
    return out


def descriptor_path(fallback_dir: Path) -> Path:
    """deploy/envoy/moemesh.pb when this is a checkout, else a freshly built one under `fallback_dir`."""
    checked_in = ROOT / DESCRIPTOR_SET
    if checked_in.is_file():
        return checked_in
    path = fallback_dir / "moemesh.pb"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(descriptor_set().SerializeToString())
    return path
