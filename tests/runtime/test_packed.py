"""`--backend packed` (torch's int8 / int4 CPU kernels): the packed weights against the values they stand for, the
checkpoint's int4 codes kept as they are, the expert bank's sparse and all-selected paths and whole engines against
the torch backend on tiny checkpoints, and the errors that name the field."""

from __future__ import annotations

import pytest
import torch

from moemesh.builtin.tiny import make_tiny_model
from moemesh.quant.quantizer import QuantSettings, quantize_model
from moemesh.runtime.engine import Engine
from moemesh.runtime.experts import ExpertBank
from moemesh.runtime.packed import (Codes, PackedWeight, codes_of, concat, grid_codes, pack, pack_int4, pack_int8,
                                    summary)
from moemesh.runtime.packed_layers import PackedLinear
from moemesh.runtime.quant import quantize_int4

BF16 = 2 ** -8  # relative rounding of a bf16 activation / scale


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_rounds_each_row_once_and_refuses_what_the_kernel_cannot_take() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(48, 96), torch.randn(3, 96)
    scale = w.abs().amax(1, keepdim=True) / 127
    want = x @ ((w / scale).round() * scale).t()  # the int8 weight's own product
    packed = pack(w)
    assert isinstance(packed, PackedWeight) and packed.scheme == "int8" and packed.data.dtype == torch.int8
    assert rel(packed(x), want) < 4 * BF16
    assert packed(x).dtype == torch.float32 and packed(x.bfloat16()).dtype == torch.bfloat16
    assert pack(torch.randn(48, 24)) is None  # K % 16: torch 2.13's int8 kernel crashes on K = 8, 24, 40


def q4_1(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as GGUF's Q4_1 dequantizes: w = d * q + m per 32 columns, d and m stored in fp16; and its codes q."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (n, k))
    q[:, ::32], q[:, 1::32] = 0, 15  # llama.cpp's quantizer gives each block's min code 0 and its max code 15
    d = (torch.rand(n, k // 32) / 50 + 1e-3).half().float()
    m = (-7.5 * d + torch.randn(n, k // 32) / 200).half().float()
    return q * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1), q


def test_a_float_weight_on_a_4_bit_grid_keeps_its_exact_codes() -> None:
    w, q = q4_1(48, 96)
    codes = grid_codes(w)
    assert codes is not None and torch.equal(codes.codes.long(), q)
    assert (codes.dequantize() - w).abs().max() < 1e-6
    packed = pack(w)
    assert packed.scheme == "int4" and packed.group == 32  # half int8's bytes, and no second rounding
    x = torch.randn(3, 96)
    int8_err = rel(pack_int8(w)(x), x @ w.t())
    assert rel(packed(x), x @ w.t()) < min(4 * BF16, int8_err)  # bf16 scales: closer than int8 per row
    off = w.clone()
    off[5, 40] += 0.3 * float(codes.scale[5, 1])  # one weight off its block's grid: no exact codes, int8
    assert grid_codes(off) is None and pack(off).scheme == "int8"
    flat = w.clone()
    flat[0, :32] = 0.25  # a constant block fits no 16-level grid
    assert grid_codes(flat) is None and grid_codes(torch.randn(16, 40)) is None  # K not whole blocks of 32
    assert (summary([packed]), summary([pack(off), packed]), summary([pack(off)]), summary([])) == (
        "int4 grid", "int4 grid + int8", "int8", "int8")


def test_int4_codes_are_used_as_they_are_with_fractional_zero_points() -> None:
    torch.manual_seed(0)
    codes = Codes(torch.randint(0, 16, (32, 128)), torch.rand(32, 2) / 10, torch.rand(32, 2) * 15, 4, 64)
    packed = pack_int4(codes)
    assert packed is not None and packed.scheme == "int4" and packed.group == 64
    x = torch.randn(5, 128)
    assert rel(packed(x), x @ codes.dequantize().t()) < 4 * BF16
    assert pack_int4(Codes(codes.codes[:24], codes.scale[:24], codes.zero[:24], 4, 64)) is None  # N % 16


def test_a_quant_tensor_with_a_cut_last_group_keeps_its_values() -> None:
    torch.manual_seed(0)
    q = quantize_int4(torch.randn(32, 192), 128)  # K 192: a group of 128 and one of 64 columns
    c = codes_of(q)
    assert torch.equal(c.dequantize(), q.dequantize(torch.float32))
    packed = pack(q)
    assert packed.scheme == "int4" and packed.group == 64  # 64 divides K and the checkpoint's group
    x = torch.randn(2, 192)
    assert rel(packed(x), x @ q.dequantize(torch.float32).t()) < 4 * BF16


def test_codes_joined_by_columns_regroup_and_keep_their_values() -> None:
    torch.manual_seed(0)
    parts = [codes_of(quantize_int4(torch.randn(16, 192), 128, symmetric=False)) for _ in range(3)]
    joined = concat(parts, 1)
    assert joined.group == 64 and joined.codes.shape == (16, 576)
    assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts], 1))
    assert concat([parts[0], Codes(parts[1].codes, parts[1].scale, parts[1].zero, 4, 32)], 0) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, builtin_dense_dir):
    """(float checkpoint, its int4 round-to-nearest copy) of tiny MoEs: top-2 of 4 and top-4 of 4 (all selected)."""
    root = tmp_path_factory.mktemp("packed")
    made = {}
    for name, top_k in (("sparse", 2), ("dense", 4)):
        src = make_tiny_model(root / name, top_k=top_k, tokenizer_from=builtin_dense_dir)
        quantize_model(src, root / f"{name}-int4", QuantSettings(bits=4, method="rtn", group_size=32),
                       log=lambda _: None)
        made[name] = (src, root / f"{name}-int4")
    return made


@pytest.mark.parametrize("routing", ["sparse", "dense"])
def test_packed_experts_match_the_torch_bank(tiny, routing: str) -> None:
    src, qdir = tiny[routing]
    torch.manual_seed(0)
    for path, scheme in ((src, "int8"), (qdir, "int4")):
        ref, packed = ExpertBank.load(path), ExpertBank.load(path, packed=True)
        form = packed.packed.dense(0)[1] if routing == "dense" else packed.packed.each(0)[0][1]
        assert isinstance(form, PackedWeight) and form.scheme == scheme  # the checkpoint's int4 codes stay int4
        hidden = torch.randn(6, ref.spec.hidden_size)
        ids = torch.stack([torch.randperm(4)[:ref.spec.moe.top_k] for _ in range(6)])
        weights = torch.rand(6, ref.spec.moe.top_k)
        for layer in ref.layers:
            a, b = ref.forward(layer, hidden, ids, weights), packed.forward(layer, hidden, ids, weights)
            assert rel(b, a) < (0.02 if scheme == "int8" else 8 * BF16), (layer, rel(b, a))


def test_a_shard_of_packed_experts_adds_only_its_own(tiny) -> None:
    _, qdir = tiny["sparse"]
    ref, packed = ExpertBank.load(qdir, experts=[1, 2]), ExpertBank.load(qdir, experts=[1, 2], packed=True)
    hidden, ids = torch.randn(4, ref.spec.hidden_size), torch.tensor([[0, 1], [2, 3], [3, 0], [1, 2]])
    weights = torch.rand(4, 2)
    a, b = ref.forward(0, hidden, ids, weights), packed.forward(0, hidden, ids, weights)
    assert rel(b, a) < 8 * BF16 and b[2].abs().max() == 0


def test_the_packed_engine_tracks_the_torch_engine(tiny) -> None:
    src, qdir = tiny["sparse"]
    ids = [1, 5, 9, 33, 100, 7, 8, 200, 3]
    for path in (src, qdir):
        ref, packed = Engine.load(path, kv_blocks=8), Engine.load(path, kv_blocks=8, backend="packed")
        attn = packed.backbone.layers[1].attn
        assert isinstance(attn.fused_qkv, PackedLinear) and attn.q_proj is None
        assert isinstance(attn.o_proj, PackedLinear)
        assert packed.backbone.packed_head is not None
        a, b = ref.forward_logits([ids])[0], packed.forward_logits([ids])[0]
        assert rel(b, a) < 0.03, rel(b, a)
        assert b.argmax(-1).eq(a.argmax(-1)).float().mean() > 0.75
    assert Engine.load(src, kv_blocks=8, backend="packed").info.quantization == "int8"
    assert "int4" in Engine.load(qdir, kv_blocks=8, backend="packed").info.quantization


def test_bad_settings_name_the_field(tiny) -> None:
    src, _ = tiny["sparse"]
    with pytest.raises(ValueError, match="device 'cuda' is not the CPU"):
        Engine.load(src, backend="packed", device="cuda")
    with pytest.raises(ValueError, match="quantization 'fp8' has no packed CPU kernel"):
        Engine.load(src, backend="packed", quantization="fp8")
    from moemesh.serving.config import ConfigError
    from services.expert.config import ExpertConfig

    with pytest.raises(ConfigError, match="backend.*needs device cpu"):
        ExpertConfig(model=str(src), backend="packed", device="cuda").validate()


def test_the_dense_form_serves_tokens_that_select_fewer_and_the_float_stacks_are_freed(tiny) -> None:
    src, _ = tiny["dense"]
    ref, packed = ExpertBank.load(src), ExpertBank.load(src, packed=True)
    assert packed.gate_up[0] is None and packed.weight_bytes < ref.weight_bytes / 3  # int8 against float32
    hidden = torch.randn(3, ref.spec.hidden_size)
    ids = torch.tensor([[0, 1, 2, 3], [3, -1, 1, -1], [2, 0, -1, -1]])  # unused slots: fewer than all selected
    weights = torch.rand(3, 4)
    a, b = ref.forward(1, hidden, ids, weights), packed.forward(1, hidden, ids, weights)
    assert rel(b, a) < 0.02, rel(b, a)
