"""The server secret that keys the API-key hashes (HMAC-SHA256). Redis holds only HMACs, so a copy of the Redis data
alone cannot be used to check guesses of keys; the secret stays outside Redis, in a 0600 file under MOEMESH_HOME.

Several metering replicas (and the CLI) must share it: same MOEMESH_HOME, or `MOEMESH_METERING_SECRET` (at least 32
characters) / `--secret-file` on every one of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_ENV = "MOEMESH_METERING_SECRET"


def default_secret_path() -> Path:
    from moemesh.home import subdir

    path = subdir("secrets")
    path.chmod(0o700)
    return path / "metering_hmac_key"


def load_or_create_secret(path: Path | None = None, env: dict | None = None) -> bytes:
    """The secret from SECRET_ENV, else from `path` (created with 32 random bytes, mode 0600, if absent)."""
    env = os.environ if env is None else env
    if env.get(SECRET_ENV):
        value = env[SECRET_ENV]
        if len(value) < 32:
            raise ValueError(f"{SECRET_ENV}: {len(value)} characters is too short (at least 32)")
        return value.encode()
    path = Path(path) if path else default_secret_path()
    if not path.exists():
        _create(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s had mode %o; setting 0600", path, mode)
        path.chmod(0o600)
    value = path.read_text().strip()
    if len(value) < 32:
        raise ValueError(f"{path}: secret of {len(value)} characters is too short (at least 32); delete the file "
                         "to generate a new one (every API key then has to be re-issued)")
    return value.encode()


def _create(path: Path) -> None:
    """Writes a temp file (0600) and links it into place: concurrent creators agree on one secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileExistsError):  # another process won: use its secret
        os.link(tmp, path)
    tmp.unlink()
