"""From a checkpoint to a ready Engine (Engine.load): the backbone on its device and backend, the routed experts
(in process, or behind the dispatch the caller gives), the KV budget, and the paged CUDA decode runner."""

from __future__ import annotations

from pathlib import Path

import torch

from moemesh.quant.describe import describe_checkpoint
from moemesh.runtime.backbone import Backbone
from moemesh.runtime.block_manager import BlockManager
from moemesh.runtime.checkpoint import resolve_model_dir
from moemesh.runtime.dispatch import DenseModel, LocalDispatch
from moemesh.runtime.dummy import open_checkpoint
from moemesh.runtime.experts import ExpertBank
from moemesh.runtime.gpu import decode_plan, kernels_usable
from moemesh.runtime.kv_cache import FP8, KVCache, cache_dtype
from moemesh.runtime.packed import summary
from moemesh.runtime.packed_layers import pack_backbone, packed_weights
from moemesh.runtime.ort import check_backend
from moemesh.runtime.quant import check_quantization, quantize_dense_ffn
from moemesh.runtime.spec import ModelSpec, load_spec
from moemesh.runtime.types import ExpertDispatch

# Default KV budget (neither kv_blocks nor kv_memory_bytes given): 256 MiB, raised up to 1 GiB so that one
# full-context sequence fits, and never more blocks than DEFAULT_MAX_SEQUENCES full-context sequences need.
DEFAULT_KV_BYTES = 256 * 2**20
MAX_DEFAULT_KV_BYTES = 2**30
DEFAULT_MAX_SEQUENCES = 16


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return value


def load_engine(cls, model_dir: str | Path, *, dispatch: ExpertDispatch | None, device: str | torch.device,
                dtype: torch.dtype | str, kv_blocks: int | None, kv_memory_bytes: int | None, block_size: int,
                max_context: int | None, model_name: str | None, load_format: str, cuda_graphs: bool,
                quantization: str, backend: str, prefix_cache: bool, kv_cache_dtype: str = "auto"):
    """An instance of `cls` (the Engine class); the arguments are Engine.load's, documented there."""
    check_quantization(quantization)
    check_backend(backend, dtype, quantization, device)
    local = resolve_model_dir(model_dir)
    device, dtype = torch.device(device), as_dtype(dtype)
    spec = load_spec(local)
    kv_dtype = _kv_dtype(kv_cache_dtype, dtype, spec, backend)
    if max_context is not None and not 1 <= max_context <= spec.max_context:
        raise ValueError(f"max_context must be in [1, {spec.max_context}] for this model, got {max_context}")
    context = max_context or spec.max_context
    backbone = _backbone(local, spec, device, dtype, load_format, quantization, backend)
    if dispatch is None:
        dispatch = _local_dispatch(local, spec, device, dtype, load_format, quantization, backend)
    shapes = backbone.cache_shapes()
    if kv_blocks is None:
        kv_blocks = default_kv_blocks(spec, shapes, kv_dtype, context, block_size, kv_memory_bytes)
    blocks = BlockManager(kv_blocks, block_size, prefix_cache=prefix_cache)
    paged, graphs, note = decode_plan(spec, device, dtype, dispatch, cuda_graphs)
    # The paged decode runner pads batches with rows that write into one extra block no sequence owns.
    cache = KVCache(spec.num_layers, kv_blocks + paged, block_size, shapes, device, kv_dtype)
    max_context = min(context, kv_blocks * block_size)
    decode = None
    if paged:
        from moemesh.runtime.gpu.decode_graphs import DecodeRunner  # imports triton

        decode = DecodeRunner(backbone, dispatch, cache.pools, block_size, -(-max_context // block_size),
                              trash_block=kv_blocks, device=device, graphs=graphs)
    name = model_name or (local.name if Path(model_dir).expanduser().is_dir() else str(model_dir))
    engine = cls(spec, backbone, dispatch, cache, blocks, max_context=max_context, model_name=name, device=device,
                 decode=decode, cuda_graphs=note,
                 quantization=_reported(local, quantization, backend, backbone, dispatch))
    engine.model_dir, engine.backend = local, backend
    return engine


def _reported(local: Path, quantization: str, backend: str, backbone, dispatch) -> str:
    """What Router.Info says of the weights: the scheme asked for, else the checkpoint's; backends packed and
    onnxruntime run float weights as int8, or as their exact int4 codes where they lie on a 4-bit grid
    (packed.summary; ort/backbone.py schemes)."""
    described = quantization if quantization != "none" else describe_checkpoint(local)
    if backend == "packed" and described == "none":
        return summary(packed_weights(backbone, dispatch))
    if backend == "onnxruntime" and described == "none":  # what the graphs run (ort/backbone.py schemes)
        ran = getattr(backbone, "schemes", set()) | getattr(getattr(dispatch, "bank", None), "schemes", set())
        return " + ".join(s for s in ("int4 grid", "int4", "int8", "float32") if s in ran) or described
    return described


def _kv_dtype(kv_cache_dtype: str, dtype: torch.dtype, spec: ModelSpec, backend: str) -> torch.dtype:
    """The KV pools' dtype (kv_cache.py), or a ValueError naming kv_cache_dtype where fp8 is not served."""
    kv_dtype = cache_dtype(kv_cache_dtype, dtype)
    if kv_dtype == FP8 and spec.attention.mla:
        raise ValueError("kv_cache_dtype 'fp8' serves grouped-query attention; this model's latent attention (MLA) "
                         "keeps kv_cache_dtype 'auto'")
    if kv_dtype == FP8 and backend != "torch":
        raise ValueError(f"kv_cache_dtype 'fp8' needs backend 'torch', got backend {backend!r}")
    return kv_dtype


def _backbone(local: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype, load_format: str,
              quantization: str, backend: str) -> Backbone:
    """The dense part: embeddings, attention, norms, shared experts, dense FFNs (on ORT: from the quantized codes)."""
    with open_checkpoint(local, spec, load_format) as ckpt:
        backbone = Backbone.load(ckpt, spec, device, dtype)
        quantized = dict(getattr(ckpt, "quantized", {}))  # int4/int8 checkpoints: the codes, for ORT
    if spec.moe is None:
        quantize_dense_ffn(backbone, quantization)
    backbone.set_fast(not kernels_usable(device, dtype))  # the Triton kernels of gpu/fused_ops.py on CUDA
    if backend == "packed":
        pack_backbone(backbone)
    if backend == "onnxruntime":
        from moemesh.runtime.ort.backbone import OrtBackbone, default_weights

        backbone = OrtBackbone(backbone, default_weights(quantized), str(device))
    return backbone


def _local_dispatch(local: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype, load_format: str,
                    quantization: str, backend: str) -> ExpertDispatch:
    """Every routed expert in this process (or none: a dense model)."""
    if spec.moe and backend == "onnxruntime":
        from moemesh.runtime.ort.experts import OrtExpertBank

        return LocalDispatch(OrtExpertBank.load(local, device=str(device), spec=spec, load_format=load_format))
    if not spec.moe:
        return DenseModel()
    return LocalDispatch(ExpertBank.load(local, device=device, dtype=dtype, spec=spec, load_format=load_format,
                                         quantization=quantization, packed=backend == "packed"))


def default_kv_blocks(spec: ModelSpec, shapes, dtype: torch.dtype, context: int, block_size: int,
                      kv_memory_bytes: int | None) -> int:
    """The blocks kv_memory_bytes buys; without it the default budget (DEFAULT_KV_BYTES, see above)."""
    full_context = KVCache.bytes_per_token(spec.num_layers, shapes, dtype) * context
    budget = kv_memory_bytes or min(max(DEFAULT_KV_BYTES, full_context), MAX_DEFAULT_KV_BYTES)
    kv_blocks = KVCache.blocks_for_budget(budget, block_size, spec.num_layers, shapes, dtype)
    if kv_memory_bytes is None:
        kv_blocks = min(kv_blocks, DEFAULT_MAX_SEQUENCES * -(-context // block_size))
    return kv_blocks
