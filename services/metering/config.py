"""Settings of the metering process (flags, then MOEMESH_METERING_* env, then defaults; REDIS_URL keeps its name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moemesh.serving.config import ConfigError, ServiceConfig, setting
from services.metering.keys import TENANT_NAME
from services.metering.pricing import HardwareTable, PriceTable, PricingError


@dataclass(frozen=True)
class MeteringConfig(ServiceConfig):
    """Tenants, API keys, quotas, usage ledger and cost of goods, kept in Redis."""

    SERVICE: ClassVar[str] = "metering"

    port: int = setting(50056, "gRPC port (0: any free port)")
    redis_url: str = setting("", "external Redis (redis://, rediss://, unix://); empty: an embedded redis-server "
                             "in --redis-dir", env="REDIS_URL")
    redis_dir: str = setting("", "data directory of the embedded Redis; empty: MOEMESH_HOME/redis")
    redis_max_connections: int = setting(64, "size of the Redis connection pool (callers wait for a free one)")
    secret_file: str = setting("", "file with the API-key HMAC secret (created 0600 if absent); empty: "
                               "MOEMESH_HOME/secrets/metering_hmac_key; MOEMESH_METERING_SECRET overrides both")
    text_keys_file: str = setting("", "AES-256-GCM key ring for tenant text at rest (see services/metering/"
                                  "sealing.py); empty: MOEMESH_TEXT_KEYS_FILE, else MOEMESH_HOME/secrets/"
                                  "metering_text_keys (created 0600 if absent)")
    prices: str = setting("", "JSON price table ($ per 1k input/output tokens per model); empty: $0.001 per 1k")
    hardware_prices: str = setting("", "JSON hardware table merged over the defaults (see services/metering/"
                                   "pricing.py)")
    hardware: str = setting("cpu:shared", "hardware of the engine when a commit does not say: <device>:<class>")
    devices: int = setting(1, "GPUs (or CPU cores) of the engine when a commit does not say")
    reservation_ttl_s: float = setting(300.0, "seconds an uncommitted reservation lives before it is refunded")
    sweep_interval_s: float = setting(5.0, "seconds between sweeps that refund expired reservations (0: lazy only)")
    dedup_days: float = setting(7.0, "days a committed request id is remembered (retries, feedback)")
    dev_tenant: str = setting("", "create this tenant at start if absent and write an API key of it to "
                              "MOEMESH_HOME/run/dev_api_key (0600); empty: off. For `moemesh up`, not production")

    def validate(self) -> None:
        super().validate()
        if self.redis_max_connections < 1:
            raise ConfigError(f"{self.source('redis_max_connections')}: {self.redis_max_connections!r} must be >= 1")
        if self.devices < 1:
            raise ConfigError(f"{self.source('devices')}: {self.devices!r} must be >= 1")
        for name in ("reservation_ttl_s", "dedup_days"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{self.source(name)}: {getattr(self, name)!r} must be > 0")
        if not self.sweep_interval_s >= 0:
            raise ConfigError(f"{self.source('sweep_interval_s')}: {self.sweep_interval_s!r} must be >= 0")
        if self.dev_tenant and not TENANT_NAME.match(self.dev_tenant):
            raise ConfigError(f"{self.source('dev_tenant')}: {self.dev_tenant!r} must match {TENANT_NAME.pattern}")
        try:
            self.price_table()
            self.hardware_table().get(self.hardware)
        except PricingError as exc:
            raise ConfigError(f"{self.source('prices')} / {self.source('hardware_prices')} / "
                              f"{self.source('hardware')}: {exc}") from None

    def price_table(self) -> PriceTable:
        return PriceTable.load(self.prices or None)

    def hardware_table(self) -> HardwareTable:
        return HardwareTable.load(self.hardware_prices or None)
