"""The prefill MoE path (gpu/prefill_moe.py): permuted rows, TMA-descriptor GEMMs on persistent grids, two ways to
sum a token's slots. On a CPU machine its kernels run under Triton's interpreter (float16: the 3.9 interpreter's
bfloat16 tl.dot is wrong, see int4_interpret.py) against a per-expert torch loop, and compile for sm_90 without a
GPU (PTX with TMA copies and wgmma; ptxas: no spills, no serialized wgmma). On a GPU it is checked against
fused_moe."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moemesh.runtime.gpu import kernels_usable, triton_available

WHY = kernels_usable(torch.device("cuda"), torch.bfloat16)
cuda = pytest.mark.skipif(bool(WHY), reason=f"needs CUDA with Triton: {WHY}")
interpreter = pytest.mark.skipif(not triton_available() or torch.cuda.is_available(),
                                 reason="a Triton-interpreter check for a CPU machine with Triton; on a GPU the "
                                 "compiled kernels are checked by the cuda tests")
PTXAS = next((p for p in ("/usr/local/cuda-13.0/bin/ptxas", shutil.which("ptxas")) if p and Path(p).is_file()), None)

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton.jit decorates the kernels.
CHECKS = textwrap.dedent('''
    import torch
    from moemesh.runtime.gpu import prefill_moe as pm, prefill_permute as pp

    def reference(hid, wgu, wdn, ids, w):
        """sum_k w * down(silu(gate x) * up x), act rounded to the compute dtype as the kernels do."""
        t, k = ids.shape
        inter = wdn.shape[2]
        out = torch.zeros(t, hid.shape[1])
        for tt in range(t):
            for kk in range(k):
                e = int(ids[tt, kk])
                if e >= 0:
                    x = hid[tt].float()
                    g, u = wgu[e, :inter].float() @ x, wgu[e, inter:].float() @ x
                    act = (torch.nn.functional.silu(g) * u).to(hid.dtype).float()
                    out[tt] += w[tt, kk] * (wdn[e].float() @ act)
        return out

    torch.manual_seed(0)
    F16 = torch.float16
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
    for t, k, e, h, inter in ((37, 4, 8, 128, 64), (1030, 4, 4, 64, 32)):  # one-launch align; sorted (> 4096 pairs)
        hid = torch.randn(t, h, dtype=F16)
        wgu, wdn = (torch.randn(e, 2 * inter, h) * 0.1).to(F16), (torch.randn(e, h, inter) * 0.1).to(F16)
        w, ids = torch.randn(t, e).softmax(-1).topk(k, -1)
        ids[0, -1] = -1  # one slot hosted elsewhere
        ids[3] = -1  # a token whose experts are all hosted elsewhere: its row stays zero
        al, a, inv = pp.permute(hid, ids, e, 16)
        used, p = int(al.rows_used), t * k
        pairs = al.sorted_ids[:used]
        assert (a[:used][pairs == p] == 0).all(), "padding rows zero"
        hosted = ids.reshape(-1) >= 0
        for name, (al, a, inv) in (("moe_align", (al, a, inv)), ("fused", pp.permute_fused(hid, ids, e, 16))):
            rows = inv[hosted].long()
            assert torch.equal(al.sorted_ids[rows], torch.arange(p)[hosted]), name + ": inverse permutation"
            assert torch.equal(a[rows], hid[torch.arange(p)[hosted] // k]), name + ": permuted rows"
            assert int((al.sorted_ids < p).sum()) == int(hosted.sum()) and int(al.rows_used) == used, name
            blocks = al.block_expert[:used // 16]
            assert torch.equal(blocks.repeat_interleave(16)[rows], ids.reshape(-1)[hosted]), name + ": experts"
            assert (al.block_expert[used // 16:] == -1).all(), name + ": blocks past the runs"
        want = reference(hid, wgu, wdn, ids, w)
        # (combine, FUSED_GU, fused_permute, EPI_SPLIT); EPI_SPLIT (the option prefill_tma.py measures) at one size
        combos = [("gather", True, True, False), ("atomic", True, False, False),
                  ("gather", False, False, False), ("atomic", False, True, False)]
        combos += [("gather", True, True, True), ("gather", False, False, True)] if t < 100 else []
        for combine, fused, fused_permute, split in combos:
            up = {**cfg, "FUSED_GU": fused, "FLATTEN": fused}
            got = pm.prefill_moe(hid, wgu, wdn, ids, w, configs=(up, {**cfg, "EPI_SPLIT": split}), combine=combine,
                                 fused_permute=fused_permute)
            rel = ((got - want).norm() / want.norm()).item()
            case = (t, combine, fused, fused_permute, split, rel)
            assert got.dtype == torch.float32 and rel < 2e-3, case
            assert got[3].abs().max().item() == 0.0, case
    print("ok")
''')


@interpreter
def test_prefill_moe_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_unusable_operands_are_refused_with_the_reason():
    from moemesh.runtime.gpu import prefill_moe as pm
    from moemesh.runtime.quant import quantize

    hid = torch.zeros(4, 256, dtype=torch.bfloat16)
    wgu, wdn = torch.zeros(2, 2 * 96, 256, dtype=torch.bfloat16), torch.zeros(2, 256, 96, dtype=torch.bfloat16)
    assert "I 96 is not a multiple of the block 128" in pm.usable(hid, wgu, wdn)
    wgu, wdn = torch.zeros(2, 256, 256, dtype=torch.bfloat16), torch.zeros(2, 256, 128, dtype=torch.bfloat16)
    assert pm.usable(hid, wgu, wdn) == ""
    assert "quantized" in pm.usable(hid, quantize(wgu, "int8"), wdn)
    assert "dtypes" in pm.usable(hid.float(), wgu, wdn)
    assert "non-contiguous" in pm.usable(hid, wgu, wdn.transpose(1, 2).contiguous().transpose(1, 2))
    other = {**pm.DEFAULT_DOWN, "BLOCK_M": 64}
    assert "BLOCK_M differs" in pm.usable(hid, wgu, wdn, pm.DEFAULT_GATE_UP, other)
    ids, w = torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2)
    with pytest.raises(ValueError, match="combine 'sum'"):
        pm.prefill_moe(hid, wgu, wdn, ids, w, combine="sum")


def compile_sm90(fn, types: dict[str, str], consts: dict, num_warps: int, num_stages: int, meta: bool = False):
    """triton.compile for Hopper without a GPU: the PTX (meta: the compiled kernel). types: the non-i32 arguments
    (pointers, descriptors); pointers and i32 sizes get the 16-divisibility the JIT infers for aligned tensors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] == "i32" or sig[n][0] == "*"}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return kernel if meta else kernel.asm["ptx"]


def _ptxas_report(ptx: str, tmp_path: Path) -> str:
    """ptxas -v on the PTX (Triton 3.9 writes .version 9.4; CUDA 13.0's ptxas takes it as 9.0)."""
    src = tmp_path / "k.ptx"
    src.write_text(ptx.replace(".version 9.4", ".version 9.0", 1))
    done = subprocess.run([PTXAS, "-arch=sm_90a", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def _desc(shape) -> str:
    return f"tensordesc<bf16[{', '.join(map(str, shape))}]>"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_prefill_kernels_compile_for_hopper_with_tma_and_wgmma(tmp_path):
    """The default configs (H200): both GEMMs copy tiles with TMA and multiply with wgmma; ptxas (when present)
    reports no spills and no wgmma serialization; the atomic combine adds 4 floats per instruction. Only PTX that
    Triton 3.6 (the H200's) and 3.9 both emit is asserted."""
    from moemesh.runtime.gpu import prefill_moe as pm

    up, dn = pm.DEFAULT_GATE_UP, pm.DEFAULT_DOWN
    ptx = {f"gate_up pdl={p}": _gate_up_ptx(up, pdl=p) for p in (False, True)}
    # (BN, stages, atomic, split): the split epilogue's staging room buys a 4th stage; compiled with PDL
    for bn, stages, atomic, split in ((256, 3, False, False), (128, 4, True, False), (256, 4, False, True)):
        bm, bk = dn["BLOCK_M"], dn["BLOCK_K"]
        ptx[f"down {bm} x {bn} atomic={atomic} split={split}"] = compile_sm90(
            pm._down_gemm, {"act_desc": _desc([bm, bk]), "w_desc": _desc([bn, bk]),
                            "y_desc": _desc([bm, bn // 2 if split else bn]), "out_ptr": "*fp32",
                            "sorted_ptr": "*i64", "weight_ptr": "*fp32", "expert_ptr": "*i64", "rows_used_ptr": "*i64"},
            dict(TOP_K=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=dn["GROUP_M"], NUM_SMS=132,
                 FLATTEN=True, ATOMIC=atomic, EPI_SPLIT=split, PDL=split), dn["num_warps"], stages)
    assert re.search(r"(red|atom)\.global\.gpu\.relaxed\.add\.v4\.f32", ptx["down 128 x 128 atomic=True split=False"])
    for name in ("gate_up pdl=True", "down 128 x 256 atomic=False split=True"):  # compiled with PDL
        assert "griddepcontrol.wait" in ptx[name] and "griddepcontrol" not in ptx["gate_up pdl=False"], name
    for name, text in ptx.items():
        assert "cp.async.bulk.tensor" in text and "wgmma.mma_async" in text, name
        if PTXAS:
            report = _ptxas_report(text, tmp_path)
            assert "0 bytes spill stores" in report and "C7515" not in report, (name, report)


def _gate_up_ptx(cfg: dict, pdl: bool = False) -> str:
    from moemesh.runtime.gpu import prefill_moe as pm

    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    return compile_sm90(
        pm._gate_up_gemm, {"a_desc": _desc([bm, bk]), "w_desc": _desc([bn, bk]), "w2_desc": _desc([1, 2, bn, bk]),
                           "act_desc": _desc([bm, bn]), "expert_ptr": "*i64", "rows_used_ptr": "*i64"},
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], NUM_SMS=132, FLATTEN=True,
             FUSED_GU=True, PDL=pdl), cfg["num_warps"], cfg["num_stages"])


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_row_movement_kernels_compile_for_hopper():
    """The permute, count/claim and gather-sum kernels (the interpreter runs only their Python semantics)."""
    from moemesh.runtime.gpu import prefill_permute as pp

    ptrs = {"ids_ptr": "*i64", "h_ptr": "*bf16", "a_ptr": "*bf16", "inv_ptr": "*i32", "sorted_ptr": "*i64",
            "counts_ptr": "*i32", "filled_ptr": "*i32", "expert_ptr": "*i64", "rows_used_ptr": "*i64",
            "y_ptr": "*bf16", "out_ptr": "*fp32"}
    compile_sm90(pp._permute_rows, ptrs, dict(TOP_K=8, ROWS=pp.ROWS, BLOCK_H=pp.BLOCK_H), 4, 3)
    compile_sm90(pp._count_experts, ptrs, dict(CHUNK=1024, BINS=256), 4, 3)
    assert "atom.global" in compile_sm90(pp._claim_rows, ptrs, dict(TOP_K=8, BLOCK_M=128, BINS=256, ROWS=pp.ROWS,
                                                                    BLOCK_H=pp.BLOCK_H), 4, 3)
    assert "ld.global.v4" in compile_sm90(pp._gather_sum, ptrs, dict(TOP_K=8, KP=8, BLOCK_H=1024, INV=True,
                                                                     PDL=False), 4, 3)


@cuda
@pytest.mark.parametrize("combine, fused_gu, fused_permute, variant", [
    ("gather", True, True, ""), ("atomic", True, True, ""), ("gather", False, False, ""), ("atomic", True, False, ""),
    ("gather", True, True, "EPI_SPLIT"), ("gather", True, True, "PDL"), ("atomic", True, True, "PDL")])
def test_prefill_moe_matches_fused_moe_on_the_gpu(combine, fused_gu, fused_permute, variant, monkeypatch):
    from moemesh.runtime.gpu import prefill_moe as module
    from moemesh.runtime.gpu.fused_moe import fused_moe
    from moemesh.runtime.gpu.prefill_moe import ATOMIC_DOWN, DEFAULT_DOWN, DEFAULT_GATE_UP, prefill_moe

    monkeypatch.setattr(module, "ENABLED", False)  # the reference: fused_moe's own row-block GEMM at every size
    torch.manual_seed(0)
    e, h, inter, k = 16, 512, 256, 4
    wgu = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) * 0.05
    wdn = torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) * 0.05
    for t in (300, 1100):  # one-launch align; sorted align (> 4096 pairs)
        hid = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        w, ids = torch.randn(t, e, device="cuda").softmax(-1).topk(k, -1)
        ids[1] = -1  # hosted elsewhere: the row stays zero
        want = fused_moe(hid, wgu, wdn, ids, w)
        cfg_up = {**DEFAULT_GATE_UP, "FUSED_GU": fused_gu, "FLATTEN": fused_gu, "PDL": variant == "PDL"}
        cfg_down = {**(ATOMIC_DOWN if combine == "atomic" else DEFAULT_DOWN), "EPI_SPLIT": variant == "EPI_SPLIT",
                    "PDL": variant == "PDL"}
        got = prefill_moe(hid, wgu, wdn, ids, w, configs=(cfg_up, cfg_down), combine=combine,
                          fused_permute=fused_permute)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-2 and got[1].abs().max().item() == 0.0, (t, rel)
