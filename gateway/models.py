"""The models the gateway serves: canonical ids (what the other services call the model) and accepted aliases.

The canonical id is the model string the mesh was started with (MOEMESH_MODEL): a built-in name, a checkpoint
directory or a Hugging Face repo id. For a directory, its last path component is accepted as an alias, so that
`--model /tmp/x/tiny` can be called as "tiny".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path, PurePath


@dataclass(frozen=True)
class ModelDefaults:
    """A model's sampling defaults (generation_config.json); None: not set there."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class ModelEntry:
    id: str
    created: int  # Unix seconds when the gateway loaded it
    quantization: str = "none"  # the checkpoint's, from its config.json (moemesh.quant.describe)
    backend: str = "torch"  # what the mesh runs it on (MOEMESH_BACKEND)


class ModelCatalog:
    def __init__(self, model_ids: list[str], created: int | None = None, backend: str = "torch") -> None:
        if not model_ids:
            raise ValueError("the gateway needs at least one model")
        when = int(time.time()) if created is None else created
        self.entries = [ModelEntry(m, when, _quantization(m), backend) for m in model_ids]
        self._aliases: dict[str, str] = {}
        for m in model_ids:
            self._aliases[m] = m
            name = PurePath(m).name
            if name and name != m:
                self._aliases.setdefault(name, m)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    def resolve(self, name: str) -> str:
        """Canonical id for a requested model; ValueError naming the field otherwise."""
        if not name:
            raise ValueError(f"model: required (available: {', '.join(self.ids)})")
        try:
            return self._aliases[name]
        except KeyError:
            raise ValueError(f"model: {name!r} is not served (available: {', '.join(self.ids)})") from None


def _quantization(model: str) -> str:
    """A checkpoint directory's (or downloaded built-in's) quantization; "none" for anything not on this disk."""
    from moemesh.home import models_dir
    from moemesh.quant.describe import describe_checkpoint

    path = PurePath(model)
    return describe_checkpoint(path if Path(path).is_dir() else models_dir() / model)
