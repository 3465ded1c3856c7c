from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AuthenticateRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class AuthenticateResponse(_message.Message):
    __slots__ = ("tenant", "key_id", "weight", "priority")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    key_id: str
    weight: float
    priority: int
    def __init__(self, tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., weight: _Optional[float] = ..., priority: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "tenant", "model", "prompt_tokens", "max_completion_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant: str
    model: str
    prompt_tokens: int
    max_completion_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_completion_tokens: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "expires_in_s")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    expires_in_s: int
    def __init__(self, reservation_id: _Optional[str] = ..., expires_in_s: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("request_id", "tenant", "key_id", "model", "prompt_tokens", "completion_tokens", "cached_tokens", "latency_seconds", "finish_reason", "engine_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_seconds: float
    finish_reason: str
    engine_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., latency_seconds: _Optional[float] = ..., finish_reason: _Optional[str] = ..., engine_seconds: _Optional[float] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("price_usd", "cost_usd", "duplicate")
    PRICE_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    price_usd: float
    cost_usd: float
    duplicate: bool
    def __init__(self, price_usd: _Optional[float] = ..., cost_usd: _Optional[float] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "since_unix", "until_unix")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    since_unix: int
    until_unix: int
    def __init__(self, tenant: _Optional[str] = ..., since_unix: _Optional[int] = ..., until_unix: _Optional[int] = ...) -> None: ...

class UsageReport(_message.Message):
    __slots__ = ("tenant", "requests", "prompt_tokens", "completion_tokens", "price_usd", "cost_usd")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRICE_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    price_usd: float
    cost_usd: float
    def __init__(self, tenant: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., price_usd: _Optional[float] = ..., cost_usd: _Optional[float] = ...) -> None: ...
