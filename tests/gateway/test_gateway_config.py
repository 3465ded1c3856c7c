"""Gateway settings: auth needs a metering address; numbers are checked."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from moemesh.serving import ConfigError


def test_defaults_need_metering_when_auth_is_on() -> None:
    with pytest.raises(ConfigError, match="--metering-addr / METERING_ADDR: empty while auth is on"):
        GatewayConfig.from_args([], env={})
    config = GatewayConfig.from_args(["--no-auth"], env={})
    assert (config.port, config.auth, config.default_max_tokens) == (50051, False, 256)


def test_env_wiring_like_moemesh_up() -> None:
    env = {"METERING_ADDR": "127.0.0.1:7000", "TOKENIZER_ADDR": "127.0.0.1:7001", "BATCHER_ADDR": "127.0.0.1:7002",
           "MOEMESH_MODEL": "/models/tiny", "MOEMESH_GATEWAY_PORT": "0", "MOEMESH_GATEWAY_AUTH": "true"}
    config = GatewayConfig.from_args([], env=env)
    assert (config.metering_addr, config.model, config.port, config.auth) == ("127.0.0.1:7000", "/models/tiny", 0, True)


@pytest.mark.parametrize(("flags", "message"), [
    (["--no-auth", "--default-max-tokens", "0"], "--default-max-tokens / MOEMESH_GATEWAY_DEFAULT_MAX_TOKENS: 0"),
    (["--no-auth", "--request-timeout", "0"], "--request-timeout / MOEMESH_GATEWAY_REQUEST_TIMEOUT: 0.0"),
    (["--no-auth", "--batcher-addr", "nohost"], "--batcher-addr / BATCHER_ADDR: 'nohost'"),
])
def test_bad_values_are_quoted(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        GatewayConfig.from_args(flags, env={})
    assert message in str(info.value)
