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
    """(cuda, interpreter) pytest marks: a test of compiled kernels on a GPU, and a check for a CPU machine with
    Triton (on a GPU the compiled kernels are checked by the cuda tests instead)."""
    import pytest
    import torch

    from moemesh.runtime.gpu import kernels_usable, triton_available

    why = kernels_usable(torch.device("cuda"), torch.bfloat16)
    return (pytest.mark.skipif(bool(why), reason=f"needs CUDA with Triton: {why}"),
            pytest.mark.skipif(not triton_available() or torch.cuda.is_available(),
                               reason="a Triton-interpreter check for a CPU machine with Triton; on a GPU the "
                               "compiled kernels are checked by the cuda tests"))


cuda, interpreter = _marks()
