"""Base of the per-service config dataclasses: frozen, read once at start from flags with environment fallbacks,
validated with errors that quote the bad value.

    @dataclass(frozen=True)
    class TokenizerConfig(ServiceConfig):
        SERVICE: ClassVar[str] = "tokenizer"
        port: int = setting(50052, "gRPC port (0: any free port)")
        models: tuple[str, ...] = setting(("smollm2",), "models to load at start (names or paths)")

    config = TokenizerConfig.load()            # flags, then env, then defaults; exits 2 with a message on bad input

Every field `foo_bar` is flag `--foo-bar` and env `MOEMESH_<SERVICE>_FOO_BAR`, unless `setting(env=...)` names the
env (the peer addresses use the mesh-wide names below). A flag wins over the env, which wins over the default.
Field types: str, int, float, bool, tuple[str, ...] (comma-separated), and `X | None`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

# Mesh-wide env names of the peer addresses (host:port), set by `moemesh up` and by the k8s manifests.
TOKENIZER_ADDR = "TOKENIZER_ADDR"
BATCHER_ADDR = "BATCHER_ADDR"
ROUTER_ADDR = "ROUTER_ADDR"
EXPERT_ADDRS = "EXPERT_ADDRS"  # comma-separated, shard order
METERING_ADDR = "METERING_ADDR"
GATEWAY_ADDR = "GATEWAY_ADDR"

C = TypeVar("C", bound="ServiceConfig")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting has a bad value; the message names the flag, the env and the value."""


def setting(default: Any, help: str, *, env: str | None = None, choices: Sequence[Any] | None = None) -> Any:
    """A config field with its help text, and optionally a fixed env name and allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "env": env, "choices": choices})


def check_address(value: str, source: str, *, allow_empty: bool = False) -> str:
    """Validates host:port (or unix:path); `source` names where the value came from for the error message."""
    if value == "" and allow_empty:
        return value
    if value.startswith("unix:") and len(value) > 5:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{source}: {value!r} is not an address of the form host:port (port 1-65535)")
    return value


@dataclass(frozen=True)
class ServiceConfig:
    """Settings every service has. Subclasses add theirs (all with defaults) and may override validate()."""

    SERVICE: ClassVar[str] = "service"

    host: str = setting("127.0.0.1", "interface to listen on (0.0.0.0 or [::] for all)")
    port: int = setting(0, "gRPC port (0: any free port)")
    metrics_port: int = setting(0, "Prometheus /metrics HTTP port (0: any free port, -1: off)")
    metrics_host: str = setting("", "interface of /metrics (empty: the same as --host, never all interfaces unless "
                                "--host is; 0.0.0.0 for a scraper on another host)")
    grace: float = setting(10.0, "seconds in-flight calls get to finish after SIGTERM")
    log_level: str = setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError quoting the first bad value."""
        if not self.host:
            raise ConfigError(f"{self.source('host')}: empty host")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"{self.source('port')}: {self.port!r} is not a port (0-65535)")
        if not -1 <= self.metrics_port < 65536:
            raise ConfigError(f"{self.source('metrics_port')}: {self.metrics_port!r} is not a port (-1-65535)")
        if not self.grace >= 0:
            raise ConfigError(f"{self.source('grace')}: {self.grace!r} must be >= 0 seconds")

    @property
    def address(self) -> str:
        """host:port to bind (port may be 0)."""
        return f"{self.host}:{self.port}"

    @classmethod
    def env_name(cls, name: str) -> str:
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        return f.metadata.get("env") or f"MOEMESH_{cls.SERVICE.upper()}_{name.upper()}"

    @classmethod
    def source(cls, name: str) -> str:
        """'--flag / ENV' for error messages."""
        return f"--{name.replace('_', '-')} / {cls.env_name(name)}"

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"moemesh-{cls.SERVICE}", description=cls.__doc__)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f"--{f.name.replace('_', '-')}"
            help_text = f"{f.metadata.get('help', '')} [env {cls.env_name(f.name)}; default {f.default!r}]"
            if _base_type(hints[f.name]) is bool:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                    help=help_text)
            else:
                parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
        return parser

    @classmethod
    def from_args(cls: type[C], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> C:
        """Flags (argv; None reads sys.argv) over env (None reads os.environ) over defaults. Raises ConfigError."""
        env = os.environ if env is None else env
        ns = cls.parser().parse_args(argv)
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = getattr(ns, f.name)
            if raw is None and cls.env_name(f.name) in env:
                raw = env[cls.env_name(f.name)]
            if raw is None:
                continue
            values[f.name] = _convert(raw, hints[f.name], cls.source(f.name))
            choices = f.metadata.get("choices")
            if choices is not None and values[f.name] not in choices:
                raise ConfigError(f"{cls.source(f.name)}: {raw!r} is not one of {list(choices)}")
        return cls(**values)

    @classmethod
    def load(cls: type[C], argv: Sequence[str] | None = None) -> C:
        """from_args for a service's main(): a bad value prints the message and exits with status 2."""
        try:
            return cls.from_args(argv)
        except ConfigError as exc:
            cls.parser().error(str(exc))
            raise  # unreachable: parser.error exits


def _base_type(hint: Any) -> Any:
    """X for `X | None`, else the hint itself."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _convert(raw: Any, hint: Any, source: str) -> Any:
    if not isinstance(raw, str):  # already typed (BooleanOptionalAction)
        return raw
    optional = _base_type(hint) is not hint
    kind = _base_type(hint)
    if optional and raw.strip().lower() in ("", "none"):
        return None
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low not in _TRUE | _FALSE:
                raise ValueError
            return low in _TRUE
        if kind is int:
            return int(raw.strip())
        if kind is float:
            return float(raw.strip())
        if typing.get_origin(kind) is tuple:
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        return raw
    except ValueError:
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{source}: {raw!r} is not a valid {name}") from None
