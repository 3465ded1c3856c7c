"""Tokenizer settings: the mesh-wide MOEMESH_MODEL, several models, bad values quoted."""

from __future__ import annotations

import pytest

from moemesh.serving import ConfigError
from services.tokenizer.catalog import TokenizerCatalog, UnknownModelError
from services.tokenizer.config import TokenizerConfig


def test_models_from_the_mesh_env() -> None:
    assert TokenizerConfig.from_args([], env={}).models == ("smollm2-moe",)
    config = TokenizerConfig.from_args([], env={"MOEMESH_MODEL": "smollm2, /models/tiny", "MOEMESH_TOKENIZER_PORT": "0"})
    assert (config.models, config.port) == (("smollm2", "/models/tiny"), 0)


def test_duplicate_or_missing_models_are_errors() -> None:
    with pytest.raises(ConfigError, match="--models / MOEMESH_MODEL: 'a,a' names a model twice"):
        TokenizerConfig.from_args(["--models", "a,a"], env={})
    with pytest.raises(ConfigError, match="no model given"):
        TokenizerConfig.from_args(["--models", ","], env={})


def test_catalog_serves_only_configured_models(chat_tokenizer) -> None:
    catalog = TokenizerCatalog({"a": chat_tokenizer})
    assert catalog.get("a") is chat_tokenizer and catalog.get("") is chat_tokenizer  # the only model
    with pytest.raises(UnknownModelError, match="model: '/etc' is not served here"):
        catalog.get("/etc")
