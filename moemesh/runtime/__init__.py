"""The MoE model runtime (torch): model definitions, shard-aware loading, KV cache, sampling, the step engine.

Pure domain code: imports neither grpc nor *_pb2. The router service wraps `engine.Engine`, the expert service wraps
`experts.ExpertBank`; see types.py for the shapes of what crosses between them.
"""
