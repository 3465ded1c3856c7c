"""Settings of the tokenizer process (flags, then MOEMESH_TOKENIZER_* env, then defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moemesh.serving.config import ConfigError, ServiceConfig, setting


@dataclass(frozen=True)
class TokenizerConfig(ServiceConfig):
    """Tokenization for the models the mesh serves (text/chat -> ids, ids -> text, streaming detokenization)."""

    SERVICE: ClassVar[str] = "tokenizer"

    port: int = setting(50052, "gRPC port (0: any free port)")
    models: tuple[str, ...] = setting(
        ("smollm2-moe",), "models to serve, comma-separated: built-in names, checkpoint dirs or HF repo ids; the "
        "string as given is the model id requests use", env="MOEMESH_MODEL",
    )

    def validate(self) -> None:
        super().validate()
        if not self.models:
            raise ConfigError(f"{self.source('models')}: no model given")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"{self.source('models')}: {','.join(self.models)!r} names a model twice")
