"""int4 expert GEMVs on activations rounded once per row (moemesh/runtime/gpu/int4_q8.py): the kernels against
float32 references under Triton's interpreter (CPU) and compiled (CUDA, the H200's own table at Qwen3-30B-A3B's
expert shape), their sm_90 code, and when fused_moe takes them."""

from __future__ import annotations

import json

import pytest
import torch

from moemesh.runtime.quant import quantize, quantize_int4

from interpreted import cuda, interpreter, needs_triton, run_interpreted
from test_prefill_moe import compile_sm90


@interpreter
def test_q8_gemvs_under_the_interpreter():
    """Both GEMVs and quantize_rows in plain Triton: within 2e-3 of the reference rounded as they round (per 8, 32
    and 64 columns), within 3e-2 of float activations; an expert hosted elsewhere adds nothing."""
    run_interpreted("import sys; sys.path.insert(0, 'tests/runtime'); import int4_q8_check; "
                    "int4_q8_check.main('cpu')")


@cuda
def test_q8_gemvs_on_the_gpu():
    import int4_q8_check

    int4_q8_check.main("cuda")


H200_INT4 = "E=128,I=768,H=2048,dtype=int4,device=NVIDIA_H200.json"


@cuda
@pytest.mark.parametrize("tokens", [1, 3])
def test_fused_moe_takes_q8_where_the_gpus_table_has_it(tokens, tmp_path, monkeypatch):
    """At Qwen3-30B-A3B's expert shape, with the H200's int4 table (copied under this GPU's name: any CUDA GPU runs
    it), fused_moe returns moe_q8's result, and the other GEMVs' with MOEMESH_INT4_Q8 off; the two within int8
    rounding of each other."""
    from moemesh.runtime.gpu import fused_moe as fm
    from moemesh.runtime.gpu.int4_q8 import moe_q8

    table = (fm.CONFIG_DIR / H200_INT4).read_text()
    monkeypatch.setattr(fm, "CONFIG_DIR", tmp_path)
    (tmp_path / fm.config_name(128, 768, 2048, "int4", torch.cuda.get_device_name())).write_text(table)
    fm._tuned.cache_clear()
    torch.manual_seed(0)
    e, inter, h = 128, 768, 2048
    gu = quantize(torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) / 45, "int4")
    dn = quantize(torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) / 28, "int4")
    hidden = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
    weights, ids = torch.randn(tokens, e, device="cuda").softmax(-1).topk(8)
    configs = fm.q8_configs(gu)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    try:
        got = fm.fused_moe(hidden, gu, dn, ids, weights)
        q8 = moe_q8(hidden, gu, dn, ids.reshape(-1), weights.reshape(-1), *configs)
        monkeypatch.setattr(fm, "Q8_ON", False)
        dp4a = fm.fused_moe(hidden, gu, dn, ids, weights)
    finally:
        fm._tuned.cache_clear()
    # the slots' float32 atomic adds land in any order: q8 within 1e-5 of itself, ~1% from the other GEMVs
    assert rel(got, q8) < 1e-5 < 1e-3 < rel(got, dp4a) < 3e-2, (rel(got, q8), rel(got, dp4a))


def test_the_h200_int4_table_runs_q8_to_20_tokens():
    """The shipped H200 table has both q8 kinds, the GEMV to 160 pairs (20 tokens at top-8; measured crossover with
    the swapped GEMM, benchmarks/results/int4-q8-h200.md) and an act group gate_up's epilogue can round."""
    from moemesh.runtime.gpu import fused_moe as fm

    entry = json.loads((fm.CONFIG_DIR / H200_INT4).read_text())["1"]
    gate_up, down = entry["q8_gate_up"], entry["q8_down"]
    assert gate_up["MAX_PAIRS"] == 160 and gate_up["G"] in (8, 16, 32, 64) and gate_up["BLOCK_N"] in (8, 16, 32, 64)
    assert down["BLOCK_K"] % 128 == 0 and down["num_warps"] >= 1


def test_q8_configs_come_only_from_a_tuned_table(tmp_path, monkeypatch):
    """q8_configs: the table's q8 kinds (device "cpu" here), None without them, with Q8 off or for other weights;
    usable() refuses zero points, other scale groups and act groups that are not 8-64 columns."""
    from moemesh.runtime.gpu import fused_moe as fm
    from moemesh.runtime.gpu.int4_q8 import usable

    w = quantize(torch.randn(4, 2 * 128, 256), "int4")
    down = quantize(torch.randn(4, 256, 128), "int4")
    gu_cfg, dn_cfg = {"G": 32, "BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 2}, {"BLOCK_N": 16, "BLOCK_K": 128,
                                                                                "num_warps": 2}
    monkeypatch.setattr(fm, "CONFIG_DIR", tmp_path)
    name = fm.config_name(4, 128, 256, "int4", "cpu")
    for entry, on, want in (({"q8_gate_up": gu_cfg, "q8_down": dn_cfg}, True, (gu_cfg, dn_cfg)),
                            ({"q8_gate_up": gu_cfg, "q8_down": dn_cfg}, False, None),
                            ({"q8_gate_up": gu_cfg}, True, None)):
        (tmp_path / name).write_text(json.dumps({"1": entry}))
        fm._tuned.cache_clear()
        monkeypatch.setattr(fm, "Q8_ON", on)
        assert fm.q8_configs(w) == want, (entry, on)
        assert fm.q8_configs(torch.randn(4, 256, 256)) is None
        assert fm.q8_configs(quantize_int4(torch.randn(4, 256, 256), 128, False)) is None  # zero points
    # the q8 GEMVs' MAX_PAIRS is how far fused_moe runs a GEMV while they are on
    (tmp_path / name).write_text(json.dumps({"1": {"q8_gate_up": {**gu_cfg, "MAX_PAIRS": 192}, "q8_down": dn_cfg}}))
    fm._tuned.cache_clear()
    monkeypatch.setattr(fm, "Q8_ON", True)
    assert fm.gemv_max_pairs(w) == 192
    monkeypatch.setattr(fm, "Q8_ON", False)
    assert fm.gemv_max_pairs(w) == fm.GEMV_MAX_PAIRS
    fm._tuned.cache_clear()
    hidden = torch.randn(1, 256)
    assert usable(hidden, w, down, gu_cfg)
    assert not usable(hidden, quantize_int4(torch.randn(4, 256, 256), 128, False), down, gu_cfg)  # zero points
    assert not usable(hidden, quantize_int4(torch.randn(4, 256, 256), 32, True), down, gu_cfg)  # groups of 32
    assert not usable(hidden, w, down, {**gu_cfg, "BLOCK_N": 4})
    assert not usable(hidden, w.dequantize(torch.float32), down, gu_cfg)


@needs_triton
def test_q8_gemv_compiles_for_hopper_on_dp4a_with_wide_loads():
    """As the H200's table runs them: gate_up (int8 act out, with PDL) and down (float32 atomics) on dp4a, the
    weight words read with 16-byte loads; quantize_rows compiles."""
    from moemesh.runtime.gpu.int4_q8 import _int4_q8_gemv, _quantize_rows

    types = {"xq_ptr": "*i8", "xs_ptr": "*fp32", "b_ptr": "*u8", "c_ptr": "*i8", "weight_ptr": "*fp32",
             "ids_ptr": "*i64", "scale_ptr": "*fp32", "cs_ptr": "*fp32"}
    gate_up = dict(K=2048, A_DIV=8, GATED=True, WEIGHTED=False, SUM_SLOTS=0, Q_OUT=True, BLOCK_N=8, BLOCK_K=1024,
                   G=32, ASM=True, ZERO_N=2048, PDL=True)
    down = dict(K=768, A_DIV=1, GATED=False, WEIGHTED=True, SUM_SLOTS=8, Q_OUT=False, BLOCK_N=16, BLOCK_K=512, G=8,
                ASM=True, ZERO_N=0, PDL=True)
    for consts, out in ((gate_up, "*i8"), (down, "*fp32")):
        ptx = compile_sm90(_int4_q8_gemv, {**types, "c_ptr": out}, consts, 2, 2)
        assert "dp4a.u32.s32" in ptx and "ld.global.v4.b32" in ptx and "griddepcontrol.wait" in ptx
    assert "st.global" in compile_sm90(_quantize_rows, {"x_ptr": "*bf16", "xq_ptr": "*i8", "xs_ptr": "*fp32"},
                                       dict(K=2048, KP=2048, G=32, PDL=False), 4, 2)
