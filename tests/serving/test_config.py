"""Service configs: flags over env over defaults, typed, validated with messages that quote the bad value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from moemesh.serving import ConfigError, ServiceConfig, check_address, setting
from moemesh.serving.config import EXPERT_ADDRS, TOKENIZER_ADDR


@dataclass(frozen=True)
class DemoConfig(ServiceConfig):
    SERVICE: ClassVar[str] = "demo"
    port: int = setting(50099, "gRPC port")
    tokenizer_addr: str = setting("127.0.0.1:50052", "tokenizer", env=TOKENIZER_ADDR)
    expert_addrs: tuple[str, ...] = setting(("127.0.0.1:1", "127.0.0.1:2"), "experts", env=EXPERT_ADDRS)
    auth: bool = setting(True, "require api keys")
    max_batch: int | None = setting(None, "batch bound")

    def validate(self) -> None:
        super().validate()
        check_address(self.tokenizer_addr, self.source("tokenizer_addr"))
        for addr in self.expert_addrs:
            check_address(addr, self.source("expert_addrs"))


def test_defaults() -> None:
    config = DemoConfig.from_args([], env={})
    assert (config.port, config.host, config.auth, config.max_batch) == (50099, "127.0.0.1", True, None)
    assert config.address == "127.0.0.1:50099"


def test_env_fallbacks_use_service_and_mesh_names() -> None:
    env = {"MOEMESH_DEMO_PORT": "6000", TOKENIZER_ADDR: "tok:7000", EXPERT_ADDRS: "a:1, b:2",
           "MOEMESH_DEMO_AUTH": "off", "MOEMESH_DEMO_MAX_BATCH": "32", "MOEMESH_DEMO_GRACE": "2.5"}
    config = DemoConfig.from_args([], env=env)
    assert config.port == 6000 and config.tokenizer_addr == "tok:7000" and config.expert_addrs == ("a:1", "b:2")
    assert config.auth is False and config.max_batch == 32 and config.grace == 2.5


def test_flags_win_over_env() -> None:
    config = DemoConfig.from_args(["--port", "7001", "--no-auth", "--tokenizer-addr", "x:1"],
                                  env={"MOEMESH_DEMO_PORT": "6000", TOKENIZER_ADDR: "tok:7000"})
    assert (config.port, config.auth, config.tokenizer_addr) == (7001, False, "x:1")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MOEMESH_DEMO_PORT": "fifty"}, "--port / MOEMESH_DEMO_PORT: 'fifty' is not a valid int"),
        ({"MOEMESH_DEMO_PORT": "70000"}, "--port / MOEMESH_DEMO_PORT: 70000 is not a port"),
        ({"MOEMESH_DEMO_GRACE": "-1"}, "--grace / MOEMESH_DEMO_GRACE: -1.0 must be >= 0"),
        ({"MOEMESH_DEMO_AUTH": "maybe"}, "--auth / MOEMESH_DEMO_AUTH: 'maybe' is not a valid bool"),
        ({TOKENIZER_ADDR: "localhost"}, "--tokenizer-addr / TOKENIZER_ADDR: 'localhost' is not an address"),
        ({EXPERT_ADDRS: "a:1,b:x"}, "--expert-addrs / EXPERT_ADDRS: 'b:x' is not an address"),
        ({"MOEMESH_DEMO_LOG_LEVEL": "LOUD"}, "--log-level / MOEMESH_DEMO_LOG_LEVEL: 'LOUD' is not one of"),
    ],
)
def test_bad_values_are_quoted(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        DemoConfig.from_args([], env=env)
    assert message in str(info.value)


def test_load_exits_2_with_the_message(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEMESH_DEMO_PORT", "nope")
    with pytest.raises(SystemExit) as info:
        DemoConfig.load([])
    assert info.value.code == 2
    assert "'nope' is not a valid int" in capsys.readouterr().err


def test_config_is_frozen() -> None:
    config = DemoConfig.from_args([], env={})
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]
