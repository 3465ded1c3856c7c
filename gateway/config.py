"""Settings of the gateway process (flags, then MOEMESH_GATEWAY_* / peer *_ADDR env, then defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moemesh.serving.config import BATCHER_ADDR, METERING_ADDR, TOKENIZER_ADDR, ConfigError, ServiceConfig
from moemesh.serving.config import check_address, setting


@dataclass(frozen=True)
class GatewayConfig(ServiceConfig):
    """The public Chat API: validation, auth and metering, then tokenizer and batcher."""

    SERVICE: ClassVar[str] = "gateway"

    port: int = setting(50051, "gRPC port of the Chat API (0: any free port)")
    model: str = setting("smollm2-moe", "model id the mesh serves (as given to the other services)",
                         env="MOEMESH_MODEL")
    tokenizer_addr: str = setting("127.0.0.1:50052", "tokenizer service address", env=TOKENIZER_ADDR)
    batcher_addr: str = setting("127.0.0.1:50053", "batcher service address; several, comma-separated (one per "
                                "router replica): each request goes to the one with the fewest open requests",
                                env=BATCHER_ADDR)
    metering_addr: str = setting("", "metering service address (empty: none; needs --no-auth)", env=METERING_ADDR)
    auth: bool = setting(True, "require `authorization: Bearer <key>` checked by metering; --no-auth: every "
                               "request is the dev tenant 'default' and no usage is recorded")
    auth_cache_seconds: float = setting(30.0, "how long a verified API key is trusted without asking metering")
    default_max_tokens: int = setting(256, "max_tokens of requests that give none")
    request_timeout: float = setting(300.0, "seconds a request may take end to end (also the batcher deadline)")
    max_n: int = setting(8, "most choices (n) one request may ask for; each is its own sequence")
    backend: str = setting("torch", "runtime the router runs the model on (reported by /v1/models)",
                           env="MOEMESH_BACKEND", choices=("torch", "onnxruntime", "packed"))

    @property
    def batcher_addrs(self) -> tuple[str, ...]:
        """The batcher addresses ("a,b" -> ("a", "b"); blanks around commas ignored)."""
        return tuple(a.strip() for a in self.batcher_addr.split(","))

    def validate(self) -> None:
        super().validate()
        check_address(self.tokenizer_addr, self.source("tokenizer_addr"))
        for address in self.batcher_addrs:
            check_address(address, self.source("batcher_addr"))
        if len(set(self.batcher_addrs)) != len(self.batcher_addrs):
            raise ConfigError(f"{self.source('batcher_addr')}: {self.batcher_addr!r} lists an address twice")
        check_address(self.metering_addr, self.source("metering_addr"), allow_empty=True)
        if self.auth and not self.metering_addr:
            raise ConfigError(f"{self.source('metering_addr')}: empty while auth is on: give the metering address, "
                              f"or pass --no-auth (dev tenant 'default')")
        if not self.model:
            raise ConfigError(f"{self.source('model')}: empty model id")
        if self.auth_cache_seconds < 0:
            raise ConfigError(f"{self.source('auth_cache_seconds')}: {self.auth_cache_seconds!r} must be >= 0")
        if self.default_max_tokens < 1:
            raise ConfigError(f"{self.source('default_max_tokens')}: {self.default_max_tokens!r} must be >= 1")
        if not 1 <= self.max_n <= 128:
            raise ConfigError(f"{self.source('max_n')}: {self.max_n!r} must be in [1, 128]")
        if not self.request_timeout > 0:
            raise ConfigError(f"{self.source('request_timeout')}: {self.request_timeout!r} must be > 0")
