"""Running a check script under Triton's interpreter: a fresh Python (TRITON_INTERPRET must be set before
triton.jit decorates the kernels) that must print "ok" last."""

from __future__ import annotations

import os
import subprocess
import sys


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
