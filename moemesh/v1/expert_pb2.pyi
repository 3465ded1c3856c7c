from moemesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertRequest(_message.Message):
    __slots__ = ("layer", "hidden", "expert_ids", "weights", "step_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: _common_pb2.Tensor
    expert_ids: _common_pb2.Tensor
    weights: _common_pb2.Tensor
    step_id: int
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., step_id: _Optional[int] = ...) -> None: ...

class ExpertResponse(_message.Message):
    __slots__ = ("output", "compute_seconds")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    output: _common_pb2.Tensor
    compute_seconds: float
    def __init__(self, output: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class ExpertInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("model", "shard_index", "num_shards", "layers", "experts", "backend", "dtype", "device", "weight_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    shard_index: int
    num_shards: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    backend: str
    dtype: str
    device: str
    weight_bytes: int
    def __init__(self, model: _Optional[str] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., experts: _Optional[_Iterable[int]] = ..., backend: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., weight_bytes: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("shm_path", "max_tokens", "hidden_size", "top_k", "dtype", "socket_path", "host_id", "cuda_ipc")
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    shm_path: str
    max_tokens: int
    hidden_size: int
    top_k: int
    dtype: str
    socket_path: str
    host_id: str
    cuda_ipc: CudaIpcRegion
    def __init__(self, shm_path: _Optional[str] = ..., max_tokens: _Optional[int] = ..., hidden_size: _Optional[int] = ..., top_k: _Optional[int] = ..., dtype: _Optional[str] = ..., socket_path: _Optional[str] = ..., host_id: _Optional[str] = ..., cuda_ipc: _Optional[_Union[CudaIpcRegion, _Mapping]] = ...) -> None: ...

class CudaIpcRegion(_message.Message):
    __slots__ = ("device", "memory_handle", "size_bytes", "offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "num_layers", "graphs")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    device: int
    memory_handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    num_layers: int
    graphs: bool
    def __init__(self, device: _Optional[int] = ..., memory_handle: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., num_layers: _Optional[int] = ..., graphs: _Optional[bool] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("ok", "reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class JoinGroupRequest(_message.Message):
    __slots__ = ("store_address", "group_name", "rank", "world_size", "backend", "hidden_size", "top_k", "dtype", "timeout_ms", "heartbeat_ms")
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    store_address: str
    group_name: str
    rank: int
    world_size: int
    backend: str
    hidden_size: int
    top_k: int
    dtype: str
    timeout_ms: int
    heartbeat_ms: int
    def __init__(self, store_address: _Optional[str] = ..., group_name: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., backend: _Optional[str] = ..., hidden_size: _Optional[int] = ..., top_k: _Optional[int] = ..., dtype: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., heartbeat_ms: _Optional[int] = ...) -> None: ...

class JoinGroupResponse(_message.Message):
    __slots__ = ("ok", "reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("interval_ms", "group_name")
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    group_name: str
    def __init__(self, interval_ms: _Optional[int] = ..., group_name: _Optional[str] = ...) -> None: ...

class WatchBeat(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...
