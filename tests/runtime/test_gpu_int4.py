"""INT4 weight-only experts (quant.py's packing, dequantized inside the fused Triton kernels): the packing and
round-to-nearest on the CPU; compressed-tensors int4 checkpoints loaded into the kernels' layout with their own codes;
the kernels themselves on the CPU through Triton's interpreter (small shapes); on CUDA, against the dequantized torch
reference in the GEMV and GEMM paths, in CUDA graphs and inside the engine's decode graphs (run on the H200)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moemesh.quant.packing import rtn
from moemesh.quant.writer import packed_tensors, quantization_config
from moemesh.runtime.engine import Engine
from moemesh.runtime.experts import ExpertBank
from moemesh.runtime.gpu import kernels_usable, triton_available
from moemesh.runtime.quant import (INT4_GROUP, QuantLinear, pack_int4, quantize, quantize_int4, stack,
                                   unpack_int4)

from test_gpu_kernels import (_assert_replays_with_new_routing, _decode_logits, _qwen3_config, _rel, _routing,
                              interpreter)

WHY = kernels_usable(torch.device("cuda"), torch.bfloat16)
cuda = pytest.mark.skipif(bool(WHY), reason=f"needs CUDA with Triton: {WHY}")
BF16 = torch.bfloat16


def test_packing_puts_a_groups_two_halves_in_the_low_and_high_nibbles():
    codes = torch.randint(0, 16, (3, 2, INT4_GROUP), dtype=torch.uint8)  # [N, G, 128]
    packed = pack_int4(codes)
    assert packed.shape == (3, 2 * 64) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 64 + 5] & 15, codes[:, 1, 5]) and torch.equal(packed[:, 64 + 5] >> 4, codes[:, 1, 69])
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("k", [256, 300])  # whole blocks; a zero-padded last block
def test_int4_round_to_nearest_has_quarter_bytes_and_bounded_error(k):
    w = torch.randn(4, 96, k)
    q = quantize(w, "int4")
    assert q.scheme == "int4" and q.shape == w.shape and not q.per_channel and q.zero is None
    assert q.q.shape == (4, 96, -(-k // 128) * 64) and q.scale.shape == (4, 96, -(-k // 128))
    assert q.nbytes == 4 * 96 * -(-k // 128) * (64 + 4)  # a byte per 2 values + a float32 scale per 128 columns
    _assert_within_half_a_step(q, w)
    assert torch.equal(q[2].dequantize(torch.float32), q.dequantize(torch.float32)[2])
    x = torch.randn(2, k)  # a dense FFN's projection over the same weight (quantize_dense_ffn)
    torch.testing.assert_close(QuantLinear(q[1], None)(x), x @ q.dequantize(torch.float32)[1].T)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_asymmetric_int4_with_small_groups(group):
    w = torch.randn(3, 8, 300) + 0.5  # off-centre rows: zero points differ from 8
    q = quantize_int4(w, group, symmetric=False)
    assert q.scale.shape == q.zero.shape == (3, 8, 384 // group) and q.block_k == group
    _assert_within_half_a_step(q, w)
    assert bool((q.zero != 8).any())
    mixed = stack([q[0], quantize_int4(w[1], group)])  # a symmetric expert among asymmetric ones: explicit 8s
    assert bool((mixed.zero[1] == 8).all()) and torch.equal(mixed.dequantize(torch.float32)[0],
                                                           q.dequantize(torch.float32)[0])


def _assert_within_half_a_step(q, w):
    err = (q.dequantize(torch.float32) - w).abs()
    step = q.scale.repeat_interleave(q.block_k, -1)[..., :w.shape[-1]]
    assert bool((err <= 0.5 * step + 1e-6).all())


def _int4_checkpoint(path: Path, symmetric: bool, group: int = INT4_GROUP) -> tuple[Path, dict]:
    """A compressed-tensors int4 checkpoint of _qwen3_config's dummy bank: (dir, name -> QWeight)."""
    bank = ExpertBank.load(path, load_format="dummy")
    inter = bank.down[bank.layers[0]].shape[2]
    tensors, qweights = {}, {}
    for layer in bank.layers:
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(bank.spec.num_experts, 256)
        for e in bank.experts:
            gate_up, down = bank.gate_up[layer][e], bank.down[layer][e]
            for name, w in (("gate_proj", gate_up[:inter]), ("up_proj", gate_up[inter:]), ("down_proj", down)):
                prefix = f"model.layers.{layer}.mlp.experts.{e}.{name}"
                qweights[prefix] = qw = rtn(w, 4, group, symmetric)
                tensors.update(packed_tensors(prefix, qw, torch.float32, symmetric))
    out = path / f"{'sym' if symmetric else 'asym'}{group}"
    out.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config({4: sorted(qweights)}, group, symmetric)
    (out / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out, qweights


def test_symmetric_int4_checkpoint_is_served_with_its_own_codes(tmp_path):
    path, qweights = _int4_checkpoint(_qwen3_config(tmp_path), symmetric=True)
    bank = ExpertBank.load(path, experts=(1, 6), quantization="int4")
    assert bank.quantization == "int4"
    got = unpack_int4(bank.gate_up[0].q[1]).flatten(-2)  # expert 6's gate and up rows, [2I, 256] codes
    want = torch.cat([qweights[f"model.layers.0.mlp.experts.6.{n}"].q for n in ("gate_proj", "up_proj")])
    assert torch.equal(got, want)
    assert torch.equal(bank.down[1].scale[0], qweights["model.layers.1.mlp.experts.1.down_proj"].scale)


@pytest.mark.parametrize("group", [128, 32])  # AWQ-like; `moemesh quantize`'s default (GPTQ, group 32, asymmetric)
def test_asymmetric_int4_checkpoint_keeps_its_codes_and_zero_points(tmp_path, group):
    path, qweights = _int4_checkpoint(_qwen3_config(tmp_path), symmetric=False, group=group)
    bank = ExpertBank.load(path, experts=(3, 4), quantization="int4")
    stored = qweights["model.layers.1.mlp.experts.4.down_proj"]
    down = bank.down[1][1]  # expert 4
    assert bank.quantization == "int4" and down.block_k == group and down.zero is not None
    assert torch.equal(unpack_int4(down.q).flatten(-2), stored.q)
    torch.testing.assert_close(down.dequantize(torch.float32), stored.dequantize())


def test_int4_checkpoint_of_other_group_size_is_requantized(tmp_path):
    path, qweights = _int4_checkpoint(_qwen3_config(tmp_path), symmetric=True, group=16)  # the kernels take 32+
    bank = ExpertBank.load(path, experts=(3,), quantization="int4")
    stored = qweights["model.layers.0.mlp.experts.3.down_proj"].dequantize()
    assert bank.down[0].block_k == INT4_GROUP and bank.down[0].zero is None  # round to nearest at load
    assert _rel(bank.down[0].dequantize(torch.float32)[0], stored) < 0.15


def test_cpu_int4_bank_follows_the_float_bank(tmp_path):
    """The torch path (dequantized on the fly) of an int4 bank: what the CPU serves and perplexity measures."""
    path = _qwen3_config(tmp_path)
    int4, full = (ExpertBank.load(path, load_format="dummy", quantization=q) for q in ("int4", "none"))
    assert int4.weight_bytes < 0.3 * full.weight_bytes / 2  # float32 here: < 0.3 of bf16's bytes
    torch.manual_seed(0)
    hidden = torch.randn(5, 256)
    ids, weights = _routing(5, 16, 4, device="cpu")
    # RTN int4 of Gaussian weights: about 11% error per weight, about 20% on the SwiGLU expert's output
    assert _rel(int4.forward(0, hidden, ids, weights), full.forward(0, hidden, ids, weights)) < 0.3


def test_cpu_engine_serves_int4_experts_and_says_so(tmp_path):
    engine = Engine.load(_qwen3_config(tmp_path), load_format="dummy", kv_blocks=8, block_size=4, quantization="int4")
    assert engine.info.quantization == "int4" and engine.dispatch.bank.quantization == "int4"  # Router.Info's field
    logits = _decode_logits(engine, [[3, 4, 5]], 2)
    assert all(bool(torch.isfinite(step).all()) for step in logits)


@interpreter
@pytest.mark.parametrize("variants", [
    # what quantize() makes: GEMV at 1 token, GEMM at 20 (both code conversions), the GEMV's decodes
    ["sym128", "sym128-magic", "sym128-words", "sym128-dp4a", "sym128-dp4a32", "sym128-i8"],
    # checkpoint layouts
    pytest.param(["asym32", "sym64", "asym128", "asym32-magic", "sym64-magic"], marks=pytest.mark.slow),
])
def test_int4_kernels_under_the_triton_interpreter(variants):
    """The int4 GEMV and GEMM paths on the CPU (int4_interpret.py): float16 within rounding of the dequantized
    reference; a token whose experts are all elsewhere gets an exact zero row."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "int4_interpret.py"), *variants], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert {key.split()[0] for key in result["rel"]} == set(variants), result
    assert all(err < 2e-3 for err in result["rel"].values()), result
    assert result["elsewhere_row"] == 0.0


def _compile_sm90(fn, pointers: list[str], consts: dict):
    """triton.compile of a kernel for Hopper without a GPU (ptxas ships with Triton): the PTX, or the compile error.
    Pointers, strides and sizes get the 16-divisibility the JIT infers for aligned tensors at run time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import inspect

    defaults = {q.name: q.default for q in fn.params if q.is_constexpr and q.default is not inspect.Parameter.empty}
    consts = {**defaults, **consts}  # constexprs left out take their defaults (not an i32 argument)
    names, ptrs, sig = fn.arg_names, iter(pointers), {}
    for n in names:
        sig[n] = "constexpr" if n in consts else next(ptrs) if n.endswith("_ptr") else "i64" if "stride" in n else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] != "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("group, zp", [(128, False), pytest.param(32, True, marks=pytest.mark.slow)])
def test_int4_kernels_compile_for_hopper_with_wide_loads(group, zp):
    """The compiled path (the interpreter test runs the Python semantics only): both int4 kernels compile for sm_90,
    gate_up (SiLU-and-mul) and down (routing weight, summed slots), the GEMV reading weights with 16-byte loads and
    the GEMM on Hopper's wgmma."""
    from moemesh.runtime.gpu.moe_kernels import _moe_gemm, _moe_gemv

    for gated in (True, False):
        flags = dict(A_DIV=8 if gated else 1, GATED=gated, WEIGHTED=not gated, QUANT=True, GROUP_K=group, INT4=True,
                     ZP=zp)
        out = "*bf16" if gated else "*fp32"
        gemv = _compile_sm90(_moe_gemv, ["*bf16", "*u8", out, "*fp32", "*i64", "*fp32", "*fp32"],
                             {**flags, "SUM_SLOTS": 0 if gated else 8, "BLOCK_N": 8, "BLOCK_K": 512, "K_STATIC": 0})
        assert "ld.global.v4.b32" in gemv
        if group == 128 and not zp:  # the word-wise GEMV as the H200's table runs it (inline lop3, 16-byte loads)
            shape = {"SUM_SLOTS": 0, "BLOCK_N": 16, "BLOCK_K": 1024, "K_STATIC": 2048} if gated else \
                {"SUM_SLOTS": 8, "BLOCK_N": 32, "BLOCK_K": 512, "K_STATIC": 768}
            words = _compile_sm90(_moe_gemv, ["*bf16", "*u8", out, "*fp32", "*i64", "*fp32", "*fp32"],
                                  {**flags, **shape, "WORDS": 2})
            assert "lop3.b32" in words and "ld.global.v4.b32" in words
            dp4a = _compile_sm90(_moe_gemv, ["*bf16", "*u8", out, "*fp32", "*i64", "*fp32", "*fp32"],
                                 {**flags, **shape, "WORDS": 4})  # integer dot products (int4_dp4a.py)
            assert "dp4a.u32.s32" in dp4a and "ld.global.v4.b32" in dp4a
        for magic in (False, True):  # both ways codes become floats (a tuned choice)
            gemm = _compile_sm90(_moe_gemm, ["*bf16", "*u8", out, "*fp32", "*i64", "*i64", "*i64", "*fp32", "*fp32"],
                                 {**flags, "EVEN_K": True, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8,
                                  "MAGIC": magic})
            assert "wgmma.mma_async" in gemm
        if group == 128 and not zp:  # the I8 candidate: int8 tensor cores (int4_dp4a._int4_mac_i8)
            i8 = _compile_sm90(_moe_gemm, ["*bf16", "*u8", out, "*fp32", "*i64", "*i64", "*i64", "*fp32", "*fp32"],
                               {**flags, "EVEN_K": True, "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1,
                                "I8": 2})
            assert re.search(r"mma[\w.]*\.s32\.s8\.s8", i8) and "and.b32" in i8


@cuda
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("variant, step", [("dp4a", 128), ("dp4a32", 32)])
def test_int4_dp4a_gemv_on_the_gpu_matches_int8_activations(tokens, variant, step):
    """The GEMV on inline dp4a (int4_dp4a.py, the H200's int4 decode) against the float32 reference whose GEMV inputs
    are rounded to int8 per 128 columns as the kernel rounds them; and near the float decode (the rounding's cost)."""
    import int4_interpret as ii

    torch.manual_seed(0)
    gu = quantize_int4(torch.randn(ii.E, 2 * ii.I, ii.H) * 0.05, 128, True)
    dn = quantize_int4(torch.randn(ii.E, ii.H, ii.I) * 0.05, 128, True)
    hidden = torch.randn(tokens, ii.H).to(ii.DT)
    weights, ids = torch.randn(tokens, ii.E).softmax(-1).topk(ii.K)
    ref = (gu.dequantize(torch.float32), dn.dequantize(torch.float32))
    args = (hidden.cuda(), gu.to("cuda"), dn.to("cuda"), ids.cuda(), weights.cuda())
    got = ii.word_gemv(*args, variant).cpu()
    assert _rel(got, ii.reference(hidden, *ref, ids, weights, x_step=step)) < 1e-4
    assert _rel(got, ii.word_gemv(*args, "words").cpu()) < 3e-2


VARIANTS = [(128, True), (32, False), (64, True), (128, False)]  # (group, symmetric): every int4 kernel branch


def _int4_bank(path, experts=None, group=INT4_GROUP, symmetric=True):
    """quantization="int4" at load (RTN, symmetric, group 128), or a bf16 dummy bank quantized as a checkpoint
    would bring it (other groups, zero points)."""
    if (group, symmetric) == (INT4_GROUP, True):
        return ExpertBank.load(path, experts=experts, device="cuda", dtype=BF16, load_format="dummy",
                               quantization="int4")
    full = ExpertBank.load(path, experts=experts, device="cuda", dtype=BF16, load_format="dummy")
    gate_up = {l: quantize_int4(w, group, symmetric) for l, w in full.gate_up.items()}
    down = {l: quantize_int4(w, group, symmetric) for l, w in full.down.items()}
    return ExpertBank(full.spec, full.experts, gate_up, down, BF16)


@cuda
@pytest.mark.parametrize("group, symmetric", VARIANTS)
@pytest.mark.parametrize("experts", [None, (0, 2, 3, 5, 8, 9, 10, 15)])  # the whole bank, or one shard
def test_int4_fused_moe_matches_the_dequantized_reference(tmp_path, experts, group, symmetric, monkeypatch):
    from moemesh.runtime.gpu import int4_prefill

    bank = _int4_bank(_qwen3_config(tmp_path), experts, group, symmetric)
    assert bank.fused_off == "" and bank.quantization == "int4"
    for t in (1, 7, 64, 300, 1100):  # GEMV (<= 32 pairs), one-launch align, sorted align (> 4096 pairs)
        hidden = torch.randn(t, 256, device="cuda", dtype=BF16)
        ids, weights = _routing(t, 16, 4)
        ids[0, -1] = -1
        if experts:  # token 1 routed only to experts hosted elsewhere: its row stays zero
            ids[min(1, t - 1)] = torch.tensor([1, 4, 6, 7], device="cuda")
        bank.fused_off = "reference"  # torch path: dequantize the layer to bf16, grouped GEMMs
        want = bank.forward(1, hidden, ids, weights)
        bank.fused_off = ""
        # from 1,024 tokens symmetric groups of 128 also round the activations to e4m3 (int4_prefill's fp8 route,
        # W8A8): checked on and, for the weight-only bound, off
        for fp8, bound in ((False, 2e-2), (True, 6e-2)) if t >= 1024 else ((True, 2e-2),):
            monkeypatch.setattr(int4_prefill, "FP8", fp8)
            got = bank.forward(1, hidden, ids, weights)
            assert got.dtype == BF16 and _rel(got, want) < bound, (t, fp8, _rel(got, want))
            if experts:
                assert got[min(1, t - 1)].abs().max().item() == 0.0


@cuda
def test_loaded_int4_bank_is_a_quarter_of_the_bytes_and_close_to_bf16(tmp_path):
    path = _qwen3_config(tmp_path)
    int4 = _int4_bank(path)
    bf16 = ExpertBank.load(path, device="cuda", dtype=BF16, load_format="dummy")
    assert int4.weight_bytes < 0.3 * bf16.weight_bytes
    hidden = torch.randn(64, 256, device="cuda", dtype=BF16)
    ids, weights = _routing(64, 16, 4)
    assert _rel(int4.forward(0, hidden, ids, weights), bf16.forward(0, hidden, ids, weights)) < 0.3  # RTN error


@cuda
@pytest.mark.parametrize("group, symmetric", [(128, True), (32, False)])
@pytest.mark.parametrize("tokens", [8, 20])  # the GEMV path and the aligned GEMM path
def test_int4_fused_moe_replays_in_a_cuda_graph(tmp_path, tokens, group, symmetric):
    bank = _int4_bank(_qwen3_config(tmp_path), None, group, symmetric)
    _assert_replays_with_new_routing(bank, tokens)


@cuda
def test_int4_decode_graphs_match_the_torch_reference(tmp_path):
    path = _qwen3_config(tmp_path)
    kw = dict(load_format="dummy", device="cuda", dtype=BF16, kv_blocks=64, block_size=16, quantization="int4")
    graphs, reference = Engine.load(path, **kw), Engine.load(path, **kw)
    reference.decode = None  # gathered context + SDPA, torch experts (dequantized) and ops
    reference.dispatch.bank.fused_off = "reference"
    reference.backbone.set_fast(False)
    assert graphs.info.cuda_graphs.startswith("on") and graphs.info.quantization == "int4"
    prompts = [[3 + i] * (5 + 9 * i) for i in range(3)]
    want = _decode_logits(reference, prompts, 12)
    got = _decode_logits(graphs, prompts, 12)
    assert all(_rel(g, w) < 3e-2 for g, w in zip(got, want)), [_rel(g, w) for g, w in zip(got, want)]


def test_gemv_serves_more_pairs_only_where_its_tuned_config_is_on_dp4a(tmp_path, monkeypatch):
    """fused_moe.gemv_max_pairs: the tuned int4 GEMV's MAX_PAIRS when that GEMV runs on dp4a (and dp4a is not turned
    off), else GEMV_MAX_PAIRS; bf16 weights never read it."""
    from moemesh.runtime.gpu import fused_moe as fm

    gemv = {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2, "WORDS": True}
    w = quantize(torch.randn(4, 2 * 128, 256), "int4")  # on the CPU: the table of device "cpu"
    name = fm.config_name(4, 128, 256, "int4", "cpu")
    monkeypatch.setattr(fm, "CONFIG_DIR", tmp_path)
    for entry, on, want in (({**gemv, "DP4A": 32, "MAX_PAIRS": 128}, True, 128),
                            ({**gemv, "DP4A": 32, "MAX_PAIRS": 128}, False, fm.GEMV_MAX_PAIRS),
                            ({**gemv, "MAX_PAIRS": 128}, True, fm.GEMV_MAX_PAIRS)):
        (tmp_path / name).write_text(json.dumps({"1": {"gemv_gate_up": entry}}))
        fm._tuned.cache_clear()
        monkeypatch.setattr(fm, "DP4A_ON", on)
        assert fm.gemv_max_pairs(w) == want, (entry, on)
        assert fm.gemv_max_pairs(torch.randn(4, 256, 256)) == fm.GEMV_MAX_PAIRS
    fm._tuned.cache_clear()


@cuda
@pytest.mark.parametrize("tokens", [1, 8, 32, 48, 128])  # the tuned GEMV on dp4a (up to MAX_PAIRS), then the GEMM
def test_int4_tuned_paths_at_qwen3_expert_shape_match_the_dequantized_reference(tokens):
    """fused_moe with the GPU's own int4 table (Qwen3-30B-A3B's expert shape: on the H200, the dp4a GEMV up to 24
    tokens, the GEMM on int8 tensor cores (I8) beyond) within int8-activation rounding (1.2% measured for the GEMV's
    steps per 32 columns, 1.6% for I8's per 128) of the float32 product with the dequantized weights; a GEMM on
    float activations within bf16 rounding."""
    from moemesh.runtime.gpu import fused_moe as fm

    torch.manual_seed(0)
    e, inter, h = 128, 768, 2048
    gu = quantize(torch.randn(e, 2 * inter, h, device="cuda", dtype=BF16) / 45, "int4")
    dn = quantize(torch.randn(e, h, inter, device="cuda", dtype=BF16) / 28, "int4")
    hidden = torch.randn(tokens, h, device="cuda", dtype=BF16)
    ids, weights = _routing(tokens, e, 8)
    got = fm.fused_moe(hidden, gu, dn, ids, weights)
    gq, dq = gu.dequantize(torch.float32), dn.dequantize(torch.float32)
    want = torch.zeros(tokens, h, device="cuda")
    for t in range(tokens):
        for s in range(8):
            g, u = (hidden[t].float() @ gq[ids[t, s]].T).chunk(2)
            want[t] += weights[t, s] * ((torch.nn.functional.silu(g) * u).to(BF16).float() @ dq[ids[t, s]].T)
    gemv = tokens * 8 <= fm.gemv_max_pairs(gu)
    rounded = fm.pick_config(1, "gemv_gate_up", gu).get("DP4A") if gemv else fm._i8(
        fm.pick_config(tokens, "gate_up", gu), {"INT4": True})
    assert _rel(got, want) < (3e-2 if rounded else 1e-2), (tokens, _rel(got, want), rounded)
