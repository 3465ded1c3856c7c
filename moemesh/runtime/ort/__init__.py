"""The ONNX Runtime backend (`--backend onnxruntime`): int4/int8 weight-only matmuls (MatMulNBits) for the dense
layers (backbone.py) and the routed experts (experts.py); torch keeps attention, routing and the KV cache, except in
decode steps that run as one ORT call (step_graph.py, step_path.py)."""

from __future__ import annotations

BACKENDS = ("torch", "onnxruntime", "packed")  # packed: torch's int8 / int4 CPU kernels (runtime/packed.py)


def check_backend(backend: str, dtype, quantization: str = "none", device=None) -> None:
    """ValueError naming the field: the ORT graphs are float32 activations with their own integer weights; the
    packed kernels are the CPU's, int8 or int4."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "packed" and device is not None and str(device).split(":")[0] != "cpu":
        raise ValueError(f"backend packed runs torch's int8 / int4 CPU kernels; device {str(device)!r} is not the CPU")
    if backend == "packed" and quantization == "fp8":
        raise ValueError("quantization 'fp8' has no packed CPU kernel: use int8 or int4 with backend packed")
    if backend == "onnxruntime" and str(dtype).removeprefix("torch.") != "float32":
        raise ValueError(f"backend onnxruntime computes in float32, got dtype {str(dtype)!r}")
    if backend == "onnxruntime" and quantization != "none":
        raise ValueError(f"quantization {quantization!r} applies to the torch backend; backend onnxruntime runs the "
                         "checkpoint's int4/int8 weights (or int8 round-to-nearest): use quantization none")
