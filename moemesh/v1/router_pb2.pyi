from moemesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SequenceWork(_message.Message):
    __slots__ = ("seq_id", "token_ids", "position", "sampling", "sample", "tenant", "cache_salt", "follows")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    position: int
    sampling: _common_pb2.SamplingParams
    sample: bool
    tenant: str
    cache_salt: str
    follows: bool
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., position: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., sample: _Optional[bool] = ..., tenant: _Optional[str] = ..., cache_salt: _Optional[str] = ..., follows: _Optional[bool] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "work", "release")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    WORK_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    work: _containers.RepeatedCompositeFieldContainer[SequenceWork]
    release: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step_id: _Optional[int] = ..., work: _Optional[_Iterable[_Union[SequenceWork, _Mapping]]] = ..., release: _Optional[_Iterable[str]] = ...) -> None: ...

class SequenceResult(_message.Message):
    __slots__ = ("seq_id", "token_id", "logprob", "top_logprobs", "cached_tokens", "prompt_logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    cached_tokens: int
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.PromptTokenLogprob]
    def __init__(self, seq_id: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., cached_tokens: _Optional[int] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.PromptTokenLogprob, _Mapping]]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("results", "compute_seconds", "kv_blocks_free", "tokens", "kv_blocks_cached", "kv_blocks_own", "released")
    class KvBlocksOwnEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_OWN_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SequenceResult]
    compute_seconds: float
    kv_blocks_free: int
    tokens: int
    kv_blocks_cached: int
    kv_blocks_own: _containers.ScalarMap[str, int]
    released: int
    def __init__(self, results: _Optional[_Iterable[_Union[SequenceResult, _Mapping]]] = ..., compute_seconds: _Optional[float] = ..., kv_blocks_free: _Optional[int] = ..., tokens: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., kv_blocks_own: _Optional[_Mapping[str, int]] = ..., released: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("seq_ids",)
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seq_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "kv_blocks_free")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    released: int
    kv_blocks_free: int
    def __init__(self, released: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ...) -> None: ...

class RouterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertPlacement(_message.Message):
    __slots__ = ("address", "layers", "experts", "transport")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    address: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    transport: str
    def __init__(self, address: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., experts: _Optional[_Iterable[int]] = ..., transport: _Optional[str] = ...) -> None: ...

class RouterInfo(_message.Message):
    __slots__ = ("model", "architecture", "max_context", "kv_block_size", "kv_blocks_total", "kv_blocks_free", "active_sequences", "vocab_size", "num_layers", "num_experts", "experts_per_token", "placement", "device", "dtype", "eos_token_ids", "moe_layers", "expert_tokens", "instance_id", "cuda_graphs", "quantization", "prefix_cache", "kv_blocks_cached", "kv_blocks_evicted", "prefix_cache_tenants", "backend", "kv_cache_dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_EVICTED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_TENANTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    architecture: str
    max_context: int
    kv_block_size: int
    kv_blocks_total: int
    kv_blocks_free: int
    active_sequences: int
    vocab_size: int
    num_layers: int
    num_experts: int
    experts_per_token: int
    placement: _containers.RepeatedCompositeFieldContainer[ExpertPlacement]
    device: str
    dtype: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    moe_layers: _containers.RepeatedScalarFieldContainer[int]
    expert_tokens: _containers.RepeatedCompositeFieldContainer[ExpertLayerLoad]
    instance_id: str
    cuda_graphs: str
    quantization: str
    prefix_cache: bool
    kv_blocks_cached: int
    kv_blocks_evicted: int
    prefix_cache_tenants: _containers.RepeatedCompositeFieldContainer[TenantCacheStats]
    backend: str
    kv_cache_dtype: str
    def __init__(self, model: _Optional[str] = ..., architecture: _Optional[str] = ..., max_context: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., active_sequences: _Optional[int] = ..., vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., experts_per_token: _Optional[int] = ..., placement: _Optional[_Iterable[_Union[ExpertPlacement, _Mapping]]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., moe_layers: _Optional[_Iterable[int]] = ..., expert_tokens: _Optional[_Iterable[_Union[ExpertLayerLoad, _Mapping]]] = ..., instance_id: _Optional[str] = ..., cuda_graphs: _Optional[str] = ..., quantization: _Optional[str] = ..., prefix_cache: _Optional[bool] = ..., kv_blocks_cached: _Optional[int] = ..., kv_blocks_evicted: _Optional[int] = ..., prefix_cache_tenants: _Optional[_Iterable[_Union[TenantCacheStats, _Mapping]]] = ..., backend: _Optional[str] = ..., kv_cache_dtype: _Optional[str] = ...) -> None: ...

class TenantCacheStats(_message.Message):
    __slots__ = ("tenant", "prompt_tokens", "cached_tokens")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    prompt_tokens: int
    cached_tokens: int
    def __init__(self, tenant: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class ExpertLayerLoad(_message.Message):
    __slots__ = ("layer", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...
