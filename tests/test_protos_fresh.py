"""The committed generated code must be exactly what `make protos` produces from protos/."""

from pathlib import Path

from moemesh import protogen


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    descriptor = tmp_path / "moemesh.pb"
    protogen.generate(tmp_path, descriptor)
    fresh = tmp_path / "moemesh" / "v1"
    committed = protogen.ROOT / "moemesh" / "v1"
    fresh_names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed_names = sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"})
    assert fresh_names == committed_names, "run `make protos`: generated file set differs"
    stale = [n for n in fresh_names if (fresh / n).read_bytes() != (committed / n).read_bytes()]
    assert not stale, f"run `make protos`: stale generated files {stale}"
    assert descriptor.read_bytes() == (protogen.ROOT / protogen.DESCRIPTOR_SET).read_bytes(), (
        "run `make protos`: deploy/envoy/moemesh.pb is stale"
    )


def test_every_rpc_and_field_is_documented() -> None:
    """The .proto files are the documentation: every rpc, message field and enum value has a comment above it."""
    undocumented = []
    for proto in protogen.proto_files():
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_rpc = s.startswith("rpc ")
            is_field = (
                s.endswith(";") and "=" in s and not s.startswith(("option", "syntax", "package", "import", "//"))
                and not s.split()[0].endswith("_UNSPECIFIED")
            )
            if any(s.startswith(k) for k in ("post:", "get:", "body:")):
                continue
            if (is_rpc or is_field) and not lines[i - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{i + 1}: {s}")
    assert not undocumented, "undocumented:\n" + "\n".join(undocumented)
