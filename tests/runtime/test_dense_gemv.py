"""dense_gemv: the decode GEMV at 1-2 rows (one program per column block reading W once for all rows) and its folded
input norm (one pass over x and delta when the K tile covers K). Under Triton's interpreter on CPU tensors (in a
fresh interpreter: TRITON_INTERPRET must be set before triton.jit decorates the kernels): every tile path against
torch, two rows in one program against each row alone, the folded norm against the unfused pair bit for bit. The
tuned-config lookup; the kernels compiled for sm_90 (Triton 3.6 on the H200: run with PYTHONPATH=/tmp/t36:.)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from interpreted import run_interpreted

from moemesh.runtime.gpu import kernels_usable, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
interpreter = pytest.mark.skipif(
    not triton_available() or torch.cuda.is_available(),
    reason="runs the kernels under Triton's interpreter on CPU tensors, which needs Triton and is checked where "
    "there is no CUDA (CI; Triton 3.6's interpreter, the H200's, fails on this numpy before these kernels); on a "
    "GPU the compiled kernels are checked by the cuda test of this file and the sweep checks every candidate")
WHY = kernels_usable(torch.device("cuda"), torch.bfloat16)
cuda = pytest.mark.skipif(bool(WHY), reason=f"needs CUDA with Triton: {WHY}")

PATHS = textwrap.dedent('''
    import torch
    from moemesh.runtime.gpu import dense_gemv, fused_ops
    from moemesh.runtime.layers import RMSNorm

    torch.manual_seed(0)
    BF, F32 = torch.bfloat16, torch.float32
    TILES = ((300, 512), (256, 128), (300, 128))  # (K, BLOCK_K): whole K (masked tail), halves, 3 steps
    for k, bk in TILES:
        x, w, b = torch.randn(2, k, dtype=BF), torch.randn(50, k, dtype=BF) / 16, torch.randn(50, dtype=BF)
        for bn, bias in ((1, None), (4, b), (32, b)):  # 50 columns: 50, 13 and 2 column blocks (masked)
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4}
            case = f"linear K={k} BK={bk} BN={bn}"
            y = dense_gemv.linear(x, w, bias, cfg)
            ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
            assert ((y.float() - ref).norm() / ref.norm()) < 1e-2, case
            rows = [dense_gemv.linear(x[i:i + 1], w, bias, cfg) for i in range(2)]
            assert torch.equal(y, torch.cat(rows)), case + ": 2 rows in one program = each row alone"
            assert torch.equal(y, dense_gemv.linear(x, w, bias, {**cfg, "ROWS": 1})), case + ": a program per row"

    nw = None
    for k, bk in TILES:
        nw = torch.rand(k, dtype=BF) + 0.5
        w, b = torch.randn(40, k, dtype=BF) / 16, torch.randn(40, dtype=BF)
        for t, d_dtype, bias in ((1, F32, None), (2, F32, b), (2, BF, None), (1, None, b), (2, None, None)):
            x = torch.randn(t, k, dtype=BF) * 3
            d = torch.randn(t, k, dtype=d_dtype) if d_dtype else None
            summed, h = fused_ops.add_rms_norm(x, d, nw, 1e-6)  # the unfused pair: add + norm, then the GEMV
            for cfg in ({"BLOCK_N": 8, "BLOCK_K": bk, "num_warps": 8}, None,  # None: the default config
                        {"BLOCK_N": 8, "BLOCK_K": bk, "num_warps": 8, "ROWS": 1}):  # a program per row
                case = f"norm K={k} BK={bk} T={t} delta={d_dtype} cfg={cfg}"
                want = dense_gemv.linear(h, w, bias, cfg)
                got_x, got = dense_gemv.norm_linear(x, d, nw, 1e-6, w, bias, cfg)
                assert torch.equal(got, want), case + ": bits of the pair"
                assert torch.equal(got_x, summed), case + ": x + delta"
                assert d is not None or got_x is x, case + ": no delta, x itself"
            ref_x = (x.float() + d.float()).to(BF) if d is not None else x
            ref = torch.nn.functional.linear(RMSNorm(nw, 1e-6)(ref_x).float(), w.float(),
                                             None if bias is None else bias.float())
            # h and y each rounded to bfloat16, toward zero by Triton 3.9's interpreter: ~1% from float32 torch
            assert (got.float() - ref).norm() / ref.norm() < 2e-2, case + ": torch"
    print("ok")
''')


@interpreter
def test_every_tile_path_matches_torch_and_the_unfused_pair_under_the_interpreter():
    run_interpreted(PATHS)


def test_configs_come_from_the_tuned_table_else_the_default(tmp_path, monkeypatch):
    from moemesh.runtime.gpu import dense_gemv

    tuned = {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 1}
    two = {"BLOCK_N": 4, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1}
    table = {dense_gemv.shape_key(5120, 2048, True): {"1": tuned, "2": two},
             dense_gemv.shape_key(2048, 4096, False): {"1": tuned}}
    (tmp_path / dense_gemv.table_name(torch.bfloat16, "cpu")).write_text(json.dumps(table))
    monkeypatch.setattr(dense_gemv, "CONFIG_DIR", tmp_path)
    dense_gemv._table.cache_clear(), dense_gemv._pick.cache_clear()
    try:
        bf, half = torch.empty(1, 1, dtype=torch.bfloat16), torch.empty(1, 1, dtype=torch.float16)
        assert dense_gemv.pick_config(5120, 2048, 1, True, bf) == tuned
        assert dense_gemv.pick_config(5120, 2048, 2, True, bf) == two
        assert dense_gemv.pick_config(2048, 4096, 2, False, bf) == tuned, "the other row count's"
        assert dense_gemv.pick_config(5120, 2048, 1, True, half) == tuned, "float16: bfloat16's table"
        for n, k, norm, w in ((5120, 2048, False, bf), (1024, 2048, True, bf),
                              (5120, 2048, True, torch.empty(1, 1))):  # not tuned: plain, other N, float32
            assert dense_gemv.pick_config(n, k, 1, norm, w) == dense_gemv.default_config(n, k, norm)
    finally:
        dense_gemv._table.cache_clear(), dense_gemv._pick.cache_clear()


SWEEP = Path(__file__).resolve().parents[2] / "benchmarks" / "h200" / "dense_gemv_sweep.py"


@interpreter
def test_the_sweep_runs_its_code_paths_under_the_interpreter(tmp_path):
    """--smoke on CPU tensors (tiny shapes, every 8th candidate; figures meaningless): every candidate it tries
    computes the right result (else it says "skip"), the baselines run, the winners come out per kind and rows."""
    out = tmp_path / "sweep.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SWEEP.parents[2])}
    done = subprocess.run([sys.executable, str(SWEEP), "--smoke", "--kinds", "qkv_norm,o", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skip" not in done.stdout, done.stdout
    doc = json.loads(out.read_text())
    assert set(doc["meta"]["best"]) == {"N=40,K=256,norm=1", "N=24,K=512,norm=0"}, doc["meta"]
    assert all(set(by_rows) == {"1", "2"} for by_rows in doc["meta"]["best"].values()), doc["meta"]
    who = {(r["kind"], r["rows"], r["who"]) for r in doc["rows"]}
    assert {("qkv_norm", 2, "norm kernel + engine GEMV"), ("o", 1, "cuBLAS"), ("o", 2, "engine pick")} <= who


def test_the_sweep_merges_its_winners_into_the_table_the_engine_reads(tmp_path, monkeypatch):
    sys.path.insert(0, str(SWEEP.parent))
    try:
        import dense_gemv_sweep as sweep
    finally:
        sys.path.remove(str(SWEEP.parent))
    from moemesh.runtime.gpu import dense_gemv

    monkeypatch.setattr(dense_gemv, "CONFIG_DIR", tmp_path)
    a, b = ({"BLOCK_N": bn, "BLOCK_K": 2048, "num_warps": 8, "num_stages": 1} for bn in (8, 16))
    sweep.write_table({"N=5120,K=2048,norm=1": {"1": a}, "N=2048,K=4096,norm=0": {"1": a}})
    path = sweep.write_table({"N=5120,K=2048,norm=1": {"2": b}, "N=2048,K=4096,norm=0": {"1": b}})
    assert path.name == dense_gemv.table_name(torch.bfloat16, sweep.device_name())
    dense_gemv._table.cache_clear()
    try:
        assert dense_gemv._table(path.name) == {"N=2048,K=4096,norm=0": {"1": b},
                                                "N=5120,K=2048,norm=1": {"1": a, "2": b}}
    finally:
        dense_gemv._table.cache_clear()


@pytest.mark.parametrize("n, k, norm", [(5120, 2048, True), (2048, 4096, False), (576, 576, True),
                                        (1024, 16384, False), (151936, 2048, False)])
def test_the_default_config_is_one_wide_tile_over_enough_programs(n, k, norm):
    from moemesh.runtime.gpu.dense_gemv import default_config

    cfg = default_config(n, k, norm)
    whole = 1 << (k - 1).bit_length()
    assert cfg["BLOCK_K"] == min(4096, whole), cfg  # whole K up to 4096: the folded norm takes its one pass
    assert -(-n // cfg["BLOCK_N"]) >= min(256, n), cfg  # enough programs for 132 SMs
    assert cfg["BLOCK_N"] * cfg["BLOCK_K"] <= 64 * 32 * cfg["num_warps"], cfg  # <= 64 weights per thread


def _compile(consts: dict, warps: int, stages: int, tmp_path) -> tuple[str, str]:
    """The sm_90 PTX of _gemv_norm (NORM; delta float32 as the engine gives it) or _gemv, with PDL, and Triton's
    own ptxas -v report of it (registers, spills)."""
    from triton.backends.nvidia.compiler import get_ptxas

    from moemesh.runtime.gpu import dense_gemv
    from test_prefill_moe import compile_sm90

    types = {**{n: "*bf16" for n in ("x_ptr", "nw_ptr", "xo_ptr", "w_ptr", "b_ptr", "y_ptr")}, "d_ptr": "*fp32",
             "eps": "fp32"}
    norm = consts.pop("NORM")
    flags = dict(HAS_BIAS=False, ADD=True, NORM_BLOCK=2048, PDL=True)
    kernel = dense_gemv._gemv_norm if norm else dense_gemv._gemv
    ptx = compile_sm90(kernel, types, {**flags, **consts}, warps, stages)
    (tmp_path / "k.ptx").write_text(ptx)
    done = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(tmp_path / "k.ptx"), "-o",
                           str(tmp_path / "k.cubin")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return ptx, done.stderr


def _tuned_configs():
    from moemesh.runtime.gpu import dense_gemv

    for path in sorted(dense_gemv.CONFIG_DIR.glob("dense_gemv,*.json")):
        for key, by_rows in json.loads(path.read_text(encoding="utf-8")).items():
            n, k, norm = (int(part.split("=")[1]) for part in key.split(","))
            for rows, cfg in by_rows.items():
                yield f"{path.name} {key} rows={rows}", k, bool(norm), int(rows), cfg


@needs_triton
def test_the_default_and_tuned_configs_compile_for_hopper_with_pdl_without_spills(tmp_path):
    """Qwen3-30B-A3B's q/k/v with the folded norm (K 2048) and o (K 4096, no norm) at 1 and 2 rows with the default
    configs, a halves tile (the K loop), and every config of the shipped tuned tables: PDL's wait, no spills."""
    from moemesh.runtime.gpu.dense_gemv import default_config

    cases = [(f"default N={n} K={k} norm={norm} rows={rows}", k, norm, rows, default_config(n, k, norm))
             for n, k, norm in ((5120, 2048, True), (2048, 4096, False)) for rows in (1, 2)]
    cases.append(("halves", 2048, True, 1, {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 2}))
    for case, k, norm, rows, cfg in [*cases, *_tuned_configs()]:
        whole = 1 << (k - 1).bit_length()
        consts = dict(NORM=norm, ADD=norm, NORM_BLOCK=whole, ROWS=min(cfg.get("ROWS", rows), rows),
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_K=min(cfg["BLOCK_K"], whole))
        ptx, report = _compile(consts, cfg["num_warps"], cfg.get("num_stages", 1), tmp_path)
        assert "griddepcontrol.wait" in ptx, case
        assert " 0 bytes spill stores" in report, (case, report)


@cuda
@pytest.mark.parametrize("rows", [1, 2])
def test_the_compiled_paths_match_the_pair_and_cublas_on_cuda(rows):
    """Qwen3-30B-A3B's q/k/v with the folded norm (delta float32 and none) and o, with the engine's pick, a narrow
    whole-K tile and a halves tile (the K loop, 2 stages): x' bit for bit, y within bf16 rounding of the pair."""
    from moemesh.runtime.gpu.dense_gemv import linear, norm_linear
    from moemesh.runtime.gpu.fused_ops import add_rms_norm

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    x, moe = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16), torch.randn(rows, 2048, device="cuda")
    nw = torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
    w_qkv = torch.randn(5120, 2048, device="cuda", dtype=torch.bfloat16) / 45
    w_o, attn = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) / 64, torch.randn(rows, 4096).cuda()
    for cfg in (None, {"BLOCK_N": 1, "BLOCK_K": 2048, "num_warps": 4},
                {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 2}):
        for delta in (moe, None):
            summed, h = add_rms_norm(x, delta, nw, 1e-6)
            got_x, got = norm_linear(x, delta, nw, 1e-6, w_qkv, None, cfg)
            assert torch.equal(got_x, summed) and rel(got, F.linear(h, w_qkv)) < 1e-2, (cfg, delta is None)
        o = attn.to(torch.bfloat16)
        assert rel(linear(o, w_o, None, cfg), F.linear(o.float(), w_o.float())) < 1e-2, cfg
