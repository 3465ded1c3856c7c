from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthenticateRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class AuthenticateResponse(_message.Message):
    __slots__ = ("tenant", "key_id", "weight", "priority", "namespace")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    key_id: str
    weight: float
    priority: int
    namespace: str
    def __init__(self, tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., weight: _Optional[float] = ..., priority: _Optional[int] = ..., namespace: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "tenant", "model", "prompt_tokens", "max_completion_tokens", "ttl_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant: str
    model: str
    prompt_tokens: int
    max_completion_tokens: int
    ttl_seconds: int
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_completion_tokens: _Optional[int] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "expires_in_s", "estimated_tokens", "estimated_price_usd")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_PRICE_USD_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    expires_in_s: int
    estimated_tokens: int
    estimated_price_usd: float
    def __init__(self, reservation_id: _Optional[str] = ..., expires_in_s: _Optional[int] = ..., estimated_tokens: _Optional[int] = ..., estimated_price_usd: _Optional[float] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("request_id", "tenant", "key_id", "model", "prompt_tokens", "completion_tokens", "cached_tokens", "latency_seconds", "finish_reason", "engine_seconds", "hardware", "devices", "user")
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
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
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
    hardware: str
    devices: int
    user: str
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., latency_seconds: _Optional[float] = ..., finish_reason: _Optional[str] = ..., engine_seconds: _Optional[float] = ..., hardware: _Optional[str] = ..., devices: _Optional[int] = ..., user: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("price_usd", "cost_usd", "duplicate", "ledger_id")
    PRICE_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ID_FIELD_NUMBER: _ClassVar[int]
    price_usd: float
    cost_usd: float
    duplicate: bool
    ledger_id: str
    def __init__(self, price_usd: _Optional[float] = ..., cost_usd: _Optional[float] = ..., duplicate: _Optional[bool] = ..., ledger_id: _Optional[str] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "since_unix", "until_unix", "caller_tenant")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    CALLER_TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    since_unix: int
    until_unix: int
    caller_tenant: str
    def __init__(self, tenant: _Optional[str] = ..., since_unix: _Optional[int] = ..., until_unix: _Optional[int] = ..., caller_tenant: _Optional[str] = ...) -> None: ...

class UsageReport(_message.Message):
    __slots__ = ("tenant", "requests", "prompt_tokens", "completion_tokens", "price_usd", "cost_usd", "cached_tokens", "engine_seconds", "margin_usd", "rated_requests", "satisfaction", "task_completion_rate", "task_completion_answers", "models")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRICE_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_USD_FIELD_NUMBER: _ClassVar[int]
    RATED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SATISFACTION_FIELD_NUMBER: _ClassVar[int]
    TASK_COMPLETION_RATE_FIELD_NUMBER: _ClassVar[int]
    TASK_COMPLETION_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    price_usd: float
    cost_usd: float
    cached_tokens: int
    engine_seconds: float
    margin_usd: float
    rated_requests: int
    satisfaction: float
    task_completion_rate: float
    task_completion_answers: int
    models: _containers.RepeatedCompositeFieldContainer[ModelUsage]
    def __init__(self, tenant: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., price_usd: _Optional[float] = ..., cost_usd: _Optional[float] = ..., cached_tokens: _Optional[int] = ..., engine_seconds: _Optional[float] = ..., margin_usd: _Optional[float] = ..., rated_requests: _Optional[int] = ..., satisfaction: _Optional[float] = ..., task_completion_rate: _Optional[float] = ..., task_completion_answers: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelUsage, _Mapping]]] = ...) -> None: ...

class ModelUsage(_message.Message):
    __slots__ = ("model", "requests", "prompt_tokens", "completion_tokens", "price_usd", "cost_usd", "satisfaction")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRICE_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    SATISFACTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    price_usd: float
    cost_usd: float
    satisfaction: float
    def __init__(self, model: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., price_usd: _Optional[float] = ..., cost_usd: _Optional[float] = ..., satisfaction: _Optional[float] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("ledger_id", "at_unix", "request_id", "tenant", "key_id", "model", "user", "prompt_tokens", "completion_tokens", "cached_tokens", "latency_seconds", "finish_reason", "engine_seconds", "hardware", "devices", "price_usd", "cost_usd", "rating", "task_completed")
    LEDGER_ID_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    PRICE_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    TASK_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ledger_id: str
    at_unix: float
    request_id: str
    tenant: str
    key_id: str
    model: str
    user: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_seconds: float
    finish_reason: str
    engine_seconds: float
    hardware: str
    devices: int
    price_usd: float
    cost_usd: float
    rating: int
    task_completed: bool
    def __init__(self, ledger_id: _Optional[str] = ..., at_unix: _Optional[float] = ..., request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., model: _Optional[str] = ..., user: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., latency_seconds: _Optional[float] = ..., finish_reason: _Optional[str] = ..., engine_seconds: _Optional[float] = ..., hardware: _Optional[str] = ..., devices: _Optional[int] = ..., price_usd: _Optional[float] = ..., cost_usd: _Optional[float] = ..., rating: _Optional[int] = ..., task_completed: _Optional[bool] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("tenant", "request_id", "rating", "task_completed", "comment")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    TASK_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    request_id: str
    rating: int
    task_completed: bool
    comment: str
    def __init__(self, tenant: _Optional[str] = ..., request_id: _Optional[str] = ..., rating: _Optional[int] = ..., task_completed: _Optional[bool] = ..., comment: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("recorded_unix",)
    RECORDED_UNIX_FIELD_NUMBER: _ClassVar[int]
    recorded_unix: float
    def __init__(self, recorded_unix: _Optional[float] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute", "concurrent_requests", "monthly_budget_usd")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    concurrent_requests: int
    monthly_budget_usd: float
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., concurrent_requests: _Optional[int] = ..., monthly_budget_usd: _Optional[float] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("name", "namespace", "quota", "weight", "priority")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    quota: Quota
    weight: float
    priority: int
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ..., weight: _Optional[float] = ..., priority: _Optional[int] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ("tenant", "api_key", "key_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: TenantInfo
    api_key: str
    key_id: str
    def __init__(self, tenant: _Optional[_Union[TenantInfo, _Mapping]] = ..., api_key: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("key_id", "created_unix", "revoked_unix")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REVOKED_UNIX_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    created_unix: float
    revoked_unix: float
    def __init__(self, key_id: _Optional[str] = ..., created_unix: _Optional[float] = ..., revoked_unix: _Optional[float] = ...) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ("name", "namespace", "created_unix", "weight", "priority", "quota", "keys", "month_spent_usd", "month_held_usd")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MONTH_SPENT_USD_FIELD_NUMBER: _ClassVar[int]
    MONTH_HELD_USD_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    created_unix: float
    weight: float
    priority: int
    quota: Quota
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    month_spent_usd: float
    month_held_usd: float
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., created_unix: _Optional[float] = ..., weight: _Optional[float] = ..., priority: _Optional[int] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ..., keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ..., month_spent_usd: _Optional[float] = ..., month_held_usd: _Optional[float] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantInfo]
    def __init__(self, tenants: _Optional[_Iterable[_Union[TenantInfo, _Mapping]]] = ...) -> None: ...

class SetQuotaRequest(_message.Message):
    __slots__ = ("name", "requests_per_minute", "tokens_per_minute", "concurrent_requests", "monthly_budget_usd", "weight", "priority")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    requests_per_minute: int
    tokens_per_minute: int
    concurrent_requests: int
    monthly_budget_usd: float
    weight: float
    priority: int
    def __init__(self, name: _Optional[str] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., concurrent_requests: _Optional[int] = ..., monthly_budget_usd: _Optional[float] = ..., weight: _Optional[float] = ..., priority: _Optional[int] = ...) -> None: ...

class IssueKeyRequest(_message.Message):
    __slots__ = ("name", "revoke_others")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_OTHERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    revoke_others: bool
    def __init__(self, name: _Optional[str] = ..., revoke_others: _Optional[bool] = ...) -> None: ...

class IssueKeyResponse(_message.Message):
    __slots__ = ("api_key", "key_id", "revoked_key_ids")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REVOKED_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    key_id: str
    revoked_key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, api_key: _Optional[str] = ..., key_id: _Optional[str] = ..., revoked_key_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("name", "key_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    key_id: str
    def __init__(self, name: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
