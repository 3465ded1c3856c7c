"""What a request is charged (per-model token prices) and what it cost us (hardware time).

Money is kept as integers wherever it is stored or summed. Prices are in nano-dollars (n$, 1e-9 USD): at $0.001 per
1k tokens one token is 1,000 n$, and the budget arithmetic in Lua (doubles) stays exact up to 2^53 n$ (about
$9 million per counter). Costs of goods are in pico-dollars (p$, 1e-12 USD): a 5 ms share of one CPU core costs
about 59 n$, so n$ would round it by up to 1%; costs take part in no Lua arithmetic, so their range is Python's.

Price table (JSON file via --prices / MOEMESH_METERING_PRICES):
    {"default": {"input_per_1k": 0.001, "output_per_1k": 0.001}, "cached_discount": 0.75,
     "models": {"smollm2": {"input_per_1k": 0.0005, "output_per_1k": 0.0015, "cached_input_per_1k": 0.0001}}}
Cached prompt tokens (served from the router's prefix cache: their K/V were not computed) cost the model's
`cached_input_per_1k`, else the input price less `cached_discount` (default 0.75: a quarter of the input price, as
DeepSeek bills cache hits). Their cost of goods is lower on its own: engine_seconds counts computed tokens only.

Hardware table (JSON file via --hardware-prices / MOEMESH_METERING_HARDWARE_PRICES, merged over the defaults):
    {"h100:spot": {"unit": "gpu", "usd_per_hour": 1.49}}
Keys are "<device>:<class>", class one of shared (on-demand / shared instances), spot, reserved. `usd_per_hour` is per
GPU (unit "gpu") or per CPU core (unit "cpu_core"). Cost of goods of a request = engine_seconds x usd_per_hour / 3600
x devices (GPUs, or cores for a CPU engine), where engine_seconds is the request's share of batch-shared engine time.

Default hardware prices (USD per device-hour; re-check before relying on them, cloud prices move monthly):

| key           | $/h     | source |
|---------------|---------|--------|
| h100:shared   | 2.23    | CoreWeave H100 on-demand, 2026 (gridstackhub.ai/learn/reserved-vs-spot-vs-on-demand-gpu) |
| h100:reserved | 1.79    | same page, 1-year reserved |
| h100:spot     | 1.49    | same page, Vast.ai spot, "typical, not guaranteed" |
| h200:shared   | 2.25    | packet.ai H200 SXM on-demand (packet.ai/blog/gpu-pricing-models-compared) |
| h200:reserved | 1.575   | same page: reserved 20-40% off; 30% taken |
| h200:spot     | 0.90    | same page: spot 50-70% below on-demand; 60% taken |
| cpu:shared    | 0.0425  | AWS c5.2xlarge on-demand $0.34/h for 8 vCPU (AWS Auto Scaling guide, spot example) |
| cpu:spot      | 0.02125 | same table, us-east-1c spot $0.170/h for 8 vCPU |
| cpu:reserved  | 0.0255  | on-demand x 0.6 (30-55% off: computingpower.org/providers/pricing-models-explained) |
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

NANO_PER_USD = 1_000_000_000
PICO_PER_USD = 1_000_000_000_000
DEFAULT_PER_1K_USD = 0.001
DEFAULT_CACHED_DISCOUNT = 0.75  # cached prompt tokens pay 25% of the input price unless a model says otherwise
INSTANCE_CLASSES = ("shared", "spot", "reserved")
UNITS = ("gpu", "cpu_core")


class PricingError(ValueError):
    """A price or hardware table entry is invalid; the message names it."""


def usd(nano: int) -> float:
    return nano / NANO_PER_USD


def usd_pico(pico: int) -> float:
    return pico / PICO_PER_USD


def _nonneg(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PricingError(f"{where}: {value!r} is not a non-negative number")
    return float(value)


@dataclass(frozen=True)
class ModelPrice:
    """Dollars per 1,000 tokens."""

    input_per_1k: float = DEFAULT_PER_1K_USD
    output_per_1k: float = DEFAULT_PER_1K_USD
    cached_input_per_1k: float | None = None  # None: input_per_1k less the table's cached_discount

    @classmethod
    def parse(cls, raw: object, where: str) -> "ModelPrice":
        if not isinstance(raw, dict):
            raise PricingError(f"{where}: {raw!r} is not an object")
        unknown = set(raw) - {"input_per_1k", "output_per_1k", "cached_input_per_1k"}
        if unknown:
            raise PricingError(f"{where}: unknown fields {sorted(unknown)}")
        cached = raw.get("cached_input_per_1k")
        return cls(
            _nonneg(raw.get("input_per_1k", DEFAULT_PER_1K_USD), f"{where}.input_per_1k"),
            _nonneg(raw.get("output_per_1k", DEFAULT_PER_1K_USD), f"{where}.output_per_1k"),
            None if cached is None else _nonneg(cached, f"{where}.cached_input_per_1k"),
        )


@dataclass(frozen=True)
class PriceTable:
    """Per-model token prices; models not listed pay `default`."""

    default: ModelPrice = ModelPrice()
    models: dict[str, ModelPrice] = field(default_factory=dict)
    cached_discount: float = DEFAULT_CACHED_DISCOUNT  # fraction of the input price cached tokens do not pay

    def for_model(self, model: str) -> ModelPrice:
        return self.models.get(model, self.default)

    def price_nano(self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """Price in n$. Cached tokens are part of prompt_tokens, billed at the cached rate."""
        p = self.for_model(model)
        cached = min(cached_tokens, prompt_tokens)
        cached_rate = (p.input_per_1k * (1 - self.cached_discount) if p.cached_input_per_1k is None
                       else p.cached_input_per_1k)
        # $/1k tokens x 1e9 n$/$ / 1e3 tokens = 1e6 n$ per (token x $/1k)
        return round(1e6 * ((prompt_tokens - cached) * p.input_per_1k + cached * cached_rate
                            + completion_tokens * p.output_per_1k))

    @classmethod
    def from_mapping(cls, raw: dict) -> "PriceTable":
        if not isinstance(raw, dict) or set(raw) - {"default", "models", "cached_discount"}:
            raise PricingError(f"price table: expected keys 'default', 'models' and 'cached_discount', "
                               f"got {raw!r:.200}")
        discount = _nonneg(raw.get("cached_discount", DEFAULT_CACHED_DISCOUNT), "cached_discount")
        if discount > 1:
            raise PricingError(f"cached_discount: {discount!r} is not in [0, 1]")
        default = ModelPrice.parse(raw["default"], "default") if "default" in raw else ModelPrice()
        models = raw.get("models", {})
        if not isinstance(models, dict):
            raise PricingError(f"models: {models!r:.200} is not an object")
        return cls(default, {name: ModelPrice.parse(v, f"models.{name}") for name, v in models.items()}, discount)

    @classmethod
    def load(cls, path: str | Path | None) -> "PriceTable":
        """The table in a JSON file; None or "": every model at the default $0.001 per 1k tokens."""
        return cls.from_mapping(_read_json(path)) if path else cls()


@dataclass(frozen=True)
class HardwarePrice:
    """Dollars per device-hour; a device is one GPU or one CPU core."""

    unit: str
    usd_per_hour: float


DEFAULT_HARDWARE: dict[str, HardwarePrice] = {
    "h100:shared": HardwarePrice("gpu", 2.23),
    "h100:reserved": HardwarePrice("gpu", 1.79),
    "h100:spot": HardwarePrice("gpu", 1.49),
    "h200:shared": HardwarePrice("gpu", 2.25),
    "h200:reserved": HardwarePrice("gpu", 1.575),
    "h200:spot": HardwarePrice("gpu", 0.90),
    "cpu:shared": HardwarePrice("cpu_core", 0.0425),
    "cpu:spot": HardwarePrice("cpu_core", 0.02125),
    "cpu:reserved": HardwarePrice("cpu_core", 0.0255),
}


@dataclass(frozen=True)
class HardwareTable:
    """Hardware prices by "<device>:<class>"."""

    entries: dict[str, HardwarePrice] = field(default_factory=lambda: dict(DEFAULT_HARDWARE))

    def get(self, key: str) -> HardwarePrice:
        try:
            return self.entries[key]
        except KeyError:
            raise PricingError(f"hardware {key!r} is not in the hardware table {sorted(self.entries)}") from None

    def cost_pico(self, key: str, devices: int, engine_seconds: float) -> int:
        """Cost of goods in p$: engine_seconds x $/device-hour / 3600 x devices."""
        if devices < 1:
            raise PricingError(f"devices: {devices!r} must be >= 1")
        if not (math.isfinite(engine_seconds) and engine_seconds >= 0):
            raise PricingError(f"engine_seconds: {engine_seconds!r} must be a finite number >= 0")
        return round(engine_seconds * self.get(key).usd_per_hour * devices * PICO_PER_USD / 3600.0)

    @classmethod
    def from_mapping(cls, raw: dict) -> "HardwareTable":
        if not isinstance(raw, dict):
            raise PricingError(f"hardware table: {raw!r:.200} is not an object")
        entries = dict(DEFAULT_HARDWARE)
        for key, value in raw.items():
            device, _, klass = key.partition(":")
            if not device or klass not in INSTANCE_CLASSES:
                raise PricingError(f"hardware {key!r}: expected '<device>:<class>', class one of {INSTANCE_CLASSES}")
            if not isinstance(value, dict) or value.get("unit") not in UNITS:
                raise PricingError(f"hardware {key!r}: 'unit' must be one of {UNITS}, got {value!r:.200}")
            entries[key] = HardwarePrice(value["unit"], _nonneg(value.get("usd_per_hour"), f"{key}.usd_per_hour"))
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path | None) -> "HardwareTable":
        return cls.from_mapping(_read_json(path)) if path else cls()


def _read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise PricingError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PricingError(f"{path} is not valid JSON: {exc}") from None
