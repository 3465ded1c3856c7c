"""The down GEMV's early L2 prefetch (fused_moe.moe_gemv's `early`, moe_kernels._prefetch_rows): compiled for
Hopper, the prefetch comes before the PDL wait and gate_up waits before it lets the down GEMV launch; on CUDA, a
decode-size MoE layer inside PDL and a CUDA graph gives the same bits with the prefetch on and off, for new routing
on every replay (run on the H200)."""

from __future__ import annotations

import re

import pytest
import torch

from moemesh.runtime.gpu import kernels_usable
from moemesh.runtime.quant import quantize

from test_gpu_kernels import _routing
from test_prefill_moe import compile_sm90

WHY = kernels_usable(torch.device("cuda"), torch.bfloat16)
cuda = pytest.mark.skipif(bool(WHY), reason=f"needs CUDA with Triton: {WHY}")
BF16 = torch.bfloat16
POINTERS = {"a_ptr": "*bf16", "b_ptr": "*u8", "c_ptr": "*fp32", "weight_ptr": "*fp32", "ids_ptr": "*i64",
            "scale_ptr": "*fp32", "zero_ptr": "*fp32"}
DOWN = dict(A_DIV=1, GATED=False, WEIGHTED=True, QUANT=True, GROUP_K=128, SUM_SLOTS=8, INT4=True, ZP=False,
            BLOCK_N=16, BLOCK_K=512, PDL=True, K_STATIC=768, WORDS=6, ZERO_N=0, EARLY_LINES=0, WAIT_FIRST=False)


def _order(ptx: str) -> list[str]:
    """The PDL and prefetch instructions of a kernel, in program order."""
    return re.findall(r"griddepcontrol\.\w+|prefetch\.global\.L2", ptx)


def test_down_gemv_prefetches_before_its_wait_and_gate_up_waits_before_letting_it_launch():
    from moemesh.runtime.gpu.moe_kernels import _moe_gemv

    plain = _order(compile_sm90(_moe_gemv, POINTERS, DOWN, 2, 2))
    early = _order(compile_sm90(_moe_gemv, POINTERS, {**DOWN, "EARLY_LINES": 4}, 2, 2))
    gate_up = _order(compile_sm90(_moe_gemv, POINTERS, {**DOWN, "WAIT_FIRST": True}, 2, 2))
    assert plain == ["griddepcontrol.launch_dependents", "griddepcontrol.wait"]
    # 16 rows x 4 lines over 64 threads: one prefetch each, all before the wait
    assert early == ["prefetch.global.L2", "griddepcontrol.launch_dependents", "griddepcontrol.wait"]
    assert gate_up == ["griddepcontrol.wait", "griddepcontrol.launch_dependents"]


@cuda
@pytest.mark.parametrize("scheme", ["int4", "fp8", None])
def test_prefetch_changes_no_bit_of_a_decode_moe_layer_in_a_pdl_graph(scheme, monkeypatch):
    from moemesh.runtime.gpu import fused_moe as fm
    from moemesh.runtime.gpu import pdl

    torch.manual_seed(0)
    e, inter, h, tokens = 128, 768, 2048, 1
    gu = torch.randn(e, 2 * inter, h, device="cuda", dtype=BF16) / 45
    dn = torch.randn(e, h, inter, device="cuda", dtype=BF16) / 28
    if scheme:
        gu, dn = quantize(gu, scheme), quantize(dn, scheme)
    hidden = torch.randn(tokens, h, device="cuda", dtype=BF16)
    ids, weights = _routing(tokens, e, 8)
    outs = {}
    for early in (True, False):
        monkeypatch.setattr(fm, "EARLY_DOWN", early)
        with pdl.enabled(True):
            fm.fused_moe(hidden, gu, dn, ids, weights)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fm.fused_moe(hidden, gu, dn, ids, weights)
        got = []
        for seed in range(3):  # new routing copied into the captured inputs before each replay
            torch.manual_seed(seed)
            new_ids, new_weights = _routing(tokens, e, 8)
            ids.copy_(new_ids)
            weights.copy_(new_weights)
            graph.replay()
            got.append(out.clone())
        outs[early] = torch.stack(got)
    assert torch.equal(outs[True], outs[False])
    assert outs[True][0].abs().sum() > 0 and not torch.equal(outs[True][0], outs[True][1])
