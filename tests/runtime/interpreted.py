"""Running a check script under Triton's interpreter: a fresh Python (TRITON_INTERPRET must be set before
triton.jit decorates the kernels) that must print "ok" last."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Check scripts that round float32 to e4m3 start with this: Triton 3.9's interpreter drops the carry when it rounds a
# mantissa up into the exponent (124.3 -> 64 in e4m3), so that conversion goes through torch (round to nearest even,
# as the GPU's cvt.rn.satfinite).
E4M3_SHIM = textwrap.dedent('''
    import numpy as np, torch
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float

    def convert_float(data, src, dst, rounding):
        if src == tl.float32 and dst == tl.float8e4nv:
            x = torch.from_numpy(np.frombuffer(data.tobytes(), dtype=np.float32).copy())
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return convert(data, src, dst, rounding)

    interpreter._convert_float = convert_float
''')

# Check scripts of paged decode attention define their reference with this: q [B, Hq, D] over pools [slots, Hkv, D]
# (float) through tables [B, W] of bs-token blocks, seq_lens [B], scale -> [B, Hq, D].
PAGED_REFERENCE = textwrap.dedent('''
    def paged_reference(q, k_slots, v_slots, tables, lens, bs, scale):
        want = torch.empty_like(q)
        for i in range(q.shape[0]):
            idx = torch.cat([torch.arange(int(j) * bs, int(j) * bs + bs) for j in tables[i]])[:int(lens[i])]
            k, v = (p[idx].float().repeat_interleave(q.shape[1] // p.shape[1], 1) for p in (k_slots, v_slots))
            want[i] = torch.einsum("ht,thd->hd", (torch.einsum("hd,thd->ht", q[i], k) * scale).softmax(-1), v)
        return want
''')


def run_interpreted(script: str, timeout: int = 600) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _marks():
    """pytest marks shared by the kernel tests: cuda (compiled kernels on a GPU), hopper (kernels needing sm_90+:
    TMA, wgmma), interpreter (a check for a CPU machine with Triton; on a GPU the compiled kernels are checked by the
    cuda tests instead), needs_triton (sm_90 compile checks, which need no GPU)."""
    import pytest
    import torch

    from moemesh.runtime.gpu import kernels_usable, triton_available

    why = kernels_usable(torch.device("cuda"), torch.bfloat16)
    old_gpu = not why and torch.cuda.get_device_capability()[0] < 9
    return (pytest.mark.skipif(bool(why), reason=f"needs CUDA with Triton: {why}"),
            pytest.mark.skipif(bool(why) or old_gpu, reason=f"needs a Hopper GPU (TMA, wgmma): {why or 'pre-sm_90'}"),
            pytest.mark.skipif(not triton_available() or torch.cuda.is_available(),
                               reason="a Triton-interpreter check for a CPU machine with Triton; on a GPU the "
                               "compiled kernels are checked by the cuda tests"),
            pytest.mark.skipif(not triton_available(), reason="triton is not installed"))


cuda, hopper, interpreter, needs_triton = _marks()
