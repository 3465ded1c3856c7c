"""A Triton kernel's sm_90 SASS without a GPU: each loop's instruction count and mix (opcode histogram).

The device runs Triton 3.6 (its own ptxas), the CPU venv 3.9, whose layouts and SASS differ (3.9 gives the swapped
MoE GEMM's weights wgmma's register operand two bytes a register, 3.6 mma.sync four). Install the device's Triton
beside the venv and put it first on the path to see what the H200 will run:

    .venv/bin/pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36:. .venv/bin/python benchmarks/h200/sass_loops.py moemesh/runtime/gpu/moe_swap.py \\
        _moe_gemm_swap '{"x_ptr": "*bf16", "w_ptr": "*u8", ...}' '{"BLOCK_N": 64, ...}' [--warps 4] [--stages 3]

Pointer arguments get their types from the JSON (the others default to i32, 16-divisible, as the JIT infers for
aligned tensors); constexprs from the second JSON. A loop is a backward branch's span; for each: its instructions and
the 25 commonest opcodes. Registers and shared memory from cuobjdump. (It counted the int4 swap's K loop at BN 64
dropping its K masks on whole steps: BK 128 352 -> 329 instructions, BK 256 699 -> 652; on the H200 itself the same
Triton gave 339 for the BK 128 loop of that day's earlier version, within the masks' difference.)
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def compile_cubin(path: str, name: str, types: dict, consts: dict, warps: int, stages: int) -> bytes:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location("kernel_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name)
    names = fn.arg_names
    consts = {k: v for k, v in consts.items() if k in names}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] == "i32" or sig[n][0] == "*"}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return kernel.asm["cubin"]


def loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """(start, end, opcode counts) of each span closed by a backward branch."""
    lines = sass.splitlines()
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in lines) if m]
    labels, pending = {}, None
    for line in lines:
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        if m and pending:
            labels[pending], pending = int(m.group(1), 16), None
    out = []
    for addr, text in ins:
        m = re.search(r"BRA.*`\(\.(L_x_\d+)\)", text)
        if m and labels.get(m.group(1), 1 << 60) < addr:
            body = [t for a, t in ins if labels[m.group(1)] <= a <= addr]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            out.append((labels[m.group(1)], addr, ops))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("kernel")
    ap.add_argument("types", type=json.loads)
    ap.add_argument("consts", type=json.loads)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    args = ap.parse_args(argv)
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compile_cubin(args.path, args.kernel, args.types, args.consts, args.warps, args.stages))
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True).stdout
    resources = " ".join(re.findall(r"REG:\d+|SHARED:\d+", usage))
    print(f"Triton {triton.__version__}, {args.kernel}: {resources}")
    for start, end, ops in loops(sass):
        print(f"loop {start:x}-{end:x}: {sum(ops.values())} instructions; "
              + ", ".join(f"{k} {v}" for k, v in ops.most_common(25)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
