"""The batch-1 decode step's small kernels as the H200 measured them fastest: norm_rope_ with one program per head
(fused_ops), paged decode attention reading the context length and the first block-table entries before the PDL
wait (paged_attention), and route_softmax's tie order and counters (fused_ops). Under Triton's interpreter on the CPU
(in a fresh interpreter: TRITON_INTERPRET must be set before triton.jit decorates the kernels), compiled for sm_90
without a GPU, and on CUDA at the Qwen3-30B-A3B shapes against the same torch references."""

from __future__ import annotations

import textwrap

import torch

from interpreted import cuda, interpreter, needs_triton, run_interpreted


# Shared by the interpreter run and the CUDA test: `dev` is set before these run.
CASES = textwrap.dedent('''
    import torch
    from moemesh.runtime.gpu import fused_ops, norm_rope, paged_attention
    from moemesh.runtime.layers import RMSNorm

    def rope_ref(x, w, cos, sin):  # x [T, H, D]: per-head RMSNorm (w; None: none) then rotate-half
        x = RMSNorm(w, 1e-6)(x) if w is not None else x
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return (x.float() * cos[:, None].float() + rot.float() * sin[:, None].float()).to(x.dtype)

    def check_norm_rope(t, hq, hk, d, dtype, tol):
        qkv0 = torch.randn(t, (hq + 2 * hk) * d, device=dev, dtype=dtype)
        cos, sin = (torch.randn(t, d, device=dev, dtype=dtype) for _ in range(2))
        slots = torch.randperm(3 * t, device=dev)[:t]
        for qw, kw in ((torch.rand(d, device=dev, dtype=dtype) + 0.5, torch.rand(d, device=dev, dtype=dtype) + 0.5),
                       (None, None)):
            qkv, k_pool, v_pool = qkv0.clone(), *(torch.zeros(3 * t, hk, d, device=dev, dtype=dtype) for _ in "kv")
            norm_rope.norm_rope_(qkv, hq, hk, d, qw, kw, 1e-6, cos, sin, (k_pool, v_pool, slots))
            q = rope_ref(qkv0[:, :hq * d].view(t, hq, d), qw, cos, sin)
            k = rope_ref(qkv0[:, hq * d:(hq + hk) * d].view(t, hk, d), kw, cos, sin)
            got = qkv[:, :(hq + hk) * d].float()
            want = torch.cat([q.reshape(t, -1), k.reshape(t, -1)], 1).float()
            case = f"norm_rope T={t} Hq={hq} Hkv={hk} D={d} norm={qw is not None}"
            assert (got - want).norm() / want.norm() < tol, (case, ((got - want).norm() / want.norm()).item())
            assert torch.equal(qkv[:, (hq + hk) * d:], qkv0[:, (hq + hk) * d:]), case + ": v untouched"
            assert torch.equal(k_pool[slots].reshape(t, -1), qkv[:, hq * d:(hq + hk) * d]), case + ": K in its slots"
            assert torch.equal(v_pool[slots].reshape(t, -1), qkv0[:, (hq + hk) * d:]), case + ": V in its slots"
            assert int((k_pool.abs().sum((1, 2)) > 0).sum()) == t, case + ": no other slot written"

    def attention_ref(q, kpool, vpool, tables, lens, scale, bs):  # [B, Hq, D] float32
        want = torch.empty_like(q, dtype=torch.float32)
        for i in range(q.shape[0]):
            n = int(lens[i])
            idx = torch.tensor([int(tables[i, j // bs]) * bs + j % bs for j in range(n)], device=q.device)
            k, v = (p[idx].float().repeat_interleave(q.shape[1] // p.shape[1], 1) for p in (kpool, vpool))
            att = (torch.einsum("hd,thd->ht", q[i].float(), k) * scale).softmax(-1)
            want[i] = torch.einsum("ht,thd->hd", att, v)
        return want

    def check_attention(b, hq, hkv, d, bs, lens, block_n, splits, dtype, tol):
        width = max(-(-n // bs) for n in lens)
        kpool, vpool = (torch.randn(b * width * bs + bs, hkv, d, device=dev, dtype=dtype) for _ in range(2))
        tables = torch.randperm(b * width + 1, device=dev)[:b * width].view(b, width).int()
        lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
        q = torch.randn(b, hq, d, device=dev, dtype=dtype)
        want = attention_ref(q, kpool, vpool, tables, lens_t, d ** -0.5, bs)
        got = paged_attention.paged_decode_attention(q, kpool, vpool, tables, lens_t, d ** -0.5, bs,
                                                     block_n=block_n, splits=splits)
        err = ((got.float() - want).norm() / want.norm()).item()
        assert err < tol, ("attention", lens, block_n, splits, err)

    def check_routing(t, e, k, renorm, scale):
        logits = torch.randn(t, e, device=dev)
        logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie for the first place: the lower index first
        logits[1, :] = 0.25  # all tied
        counts = torch.full((e,), 3, dtype=torch.int64, device=dev)
        ids, w = fused_ops.route_softmax(logits, k, renorm, scale, counts)
        p = logits.float().softmax(-1).cpu()
        want = torch.tensor([sorted(range(e), key=lambda j: (-float(p[r, j]), j))[:k] for r in range(t)])
        assert torch.equal(ids.cpu(), want), ("route ids", t, e, k)
        pw = p.gather(1, want)
        pw = pw / pw.sum(1, keepdim=True) if renorm else pw
        assert torch.allclose(w.cpu(), pw * scale, rtol=1e-5, atol=1e-7), ("route weights", t, e, k)
        assert torch.equal(counts.cpu(), 3 + torch.bincount(want.view(-1), minlength=e)), "expert counts"
''')

INTERPRETED = CASES + textwrap.dedent('''
    torch.manual_seed(0)
    dev = "cpu"
    check_norm_rope(2, 4, 2, 16, torch.float32, 1e-6)
    # Triton 3.9's interpreter rounds float32 -> bfloat16 toward zero, torch to nearest
    check_norm_rope(1, 8, 4, 16, torch.bfloat16, 2e-2)
    check_attention(3, 8, 2, 16, 4, [13, 5, 1], 4, 4, torch.float32, 1e-4)  # one tile per split, empty splits
    check_attention(2, 4, 2, 16, 4, [31, 9], 4, 2, torch.float32, 1e-4)  # 4 tiles per split: tables read ahead
    check_attention(2, 4, 1, 16, 4, [22, 3], 8, 1, torch.float32, 1e-4)  # one split: no combine
    check_routing(5, 128, 8, True, 1.0)
    check_routing(3, 100, 6, False, 2.5)  # experts not a power of two, K not one
    print("ok")
''')


@interpreter
def test_small_kernels_under_the_interpreter():
    run_interpreted(INTERPRETED)


@cuda
def test_small_kernels_on_cuda():
    scope = {}
    exec(CASES, scope)  # noqa: S102 - the checks above, on the GPU at the Qwen3-30B-A3B shapes
    scope["dev"] = "cuda"
    torch.manual_seed(0)
    scope["check_norm_rope"](3, 32, 4, 128, torch.bfloat16, 1e-2)
    scope["check_attention"](2, 32, 4, 128, 16, [130, 1], 64, 16, torch.bfloat16, 1e-2)
    scope["check_attention"](1, 32, 4, 128, 16, [2000], 64, 16, torch.bfloat16, 1e-2)
    scope["check_attention"](1, 32, 4, 128, 16, [700], 64, 1, torch.bfloat16, 1e-2)
    scope["check_routing"](9, 128, 8, True, 1.0)


def _sm90(fn, types: dict[str, str], consts: dict, num_warps: int = 4) -> str:
    from test_prefill_moe import compile_sm90

    return compile_sm90(fn, types, consts, num_warps, 2)


@needs_triton
def test_small_kernels_compile_for_hopper_with_pdl():
    """norm_rope_ and the decode attention compile for sm_90 with PDL (Triton 3.6, the H200's: PYTHONPATH=/tmp/t36),
    as launched, without spilling to local memory; the attention reads its context length before the PDL wait."""
    from moemesh.runtime.gpu import fused_ops, norm_rope, paged_attention

    types = {n: "*bf16" for n in ("qkv_ptr", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr", "kp_ptr", "vp_ptr")}
    fp8_pools = {"kp_ptr": "*u8", "vp_ptr": "*u8"}  # kv_cache_dtype "fp8": e4m3 bytes, saturated on the way in
    for fp8 in (False, True):
        ptx = _sm90(norm_rope._norm_rope, {**types, **(fp8_pools if fp8 else {}), "slot_ptr": "*i64", "eps": "fp32"},
                    dict(Q_HEADS=32, K_HEADS=4, D=128, NORM=True, WRITE_KV=True, FP8_KV=fp8, BS=16 if fp8 else 1,
                         PDL=True), 1)
        assert "griddepcontrol.wait" in ptx and "ld.local" not in ptx and ("e4m3" in ptx) == fp8, fp8
    types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "table_ptr": "*i32",
             "lens_ptr": "*i32", "part_ptr": "*fp32", "scale": "fp32"}
    for splits, fp8 in ((1, False), (16, False), (16, True)):
        kinds = {**types, **({"k_ptr": "*u8", "v_ptr": "*u8"} if fp8 else {})}
        ptx = _sm90(paged_attention._paged_decode, kinds, dict(GROUP=8, GROUP_PAD=16, HEAD_DIM=128, KV_BLOCK=16,
                    BLOCK_N=64, SPLITS=splits, FP8_KV=fp8, PDL=True))
        assert "griddepcontrol.wait" in ptx and "ld.local" not in ptx, splits
        assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), f"{splits} splits: lens read after the wait"
