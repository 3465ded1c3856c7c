"""The MoE model runtime (torch): model definitions, shard-aware loading, KV cache, sampling, the step engine.

Pure domain code: imports neither grpc nor *_pb2. The router service wraps `engine.Engine`, the expert service wraps
`experts.ExpertBank`; see types.py for the shapes of what crosses between them.

Map: spec.py (ModelSpec) <- families.py (config.json of each architecture); checkpoint.py (lazy safetensors reads);
backbone.py (embeddings, attention.py / mla.py, gate.py: the per-layer expert gate, shared experts, LM head) +
experts.py (routed experts) joined by an ExpertDispatch (dispatch.py in process); kv_cache.py + block_manager.py + step_context.py (paged KV,
ragged steps); rope.py; layers.py; engine.py (steps, release, info, scoring); sampling.py, stopping.py, generate.py.
dummy.py (load_format="dummy": random weights from config.json); quant.py (weight-only fp8/int8 experts, or a
dense model's FFN); gpu/ (CUDA only: Triton fused MoE, paged decode attention, fused small ops, decode steps in CUDA
graphs).
"""
