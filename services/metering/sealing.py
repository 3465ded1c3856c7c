"""Tenant text at rest (feedback comments): sealed with AES-256-GCM before it reaches Redis.

A copy of the Redis data (a backup, an RDB file, a replica) must not reveal what tenants wrote. The keys live outside
Redis: a key-ring file, by default `MOEMESH_HOME/secrets/metering_text_keys` (created 0600 with one random key), or
the file named by `MOEMESH_TEXT_KEYS_FILE` (a Kubernetes Secret mounted as a file). One key per line:

    <key id> <64 hex characters = 32 bytes>

The first line is the current key (every new value); the others still open what they sealed. Rotation: put a new
line first, restart metering (the CLI reads the file on every run), run `FeedbackStore.reseal` for each tenant (or
wait until nothing sealed with the old key is kept), then drop the old line.

A sealed value is `aesgcm:<key id>:<base64url(12-byte nonce | ciphertext | 16-byte tag)>`. The associated data is
the value's place (e.g. "feedback|acme|chatcmpl-1"): a ciphertext copied into another tenant's or request's slot
does not open.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEYS_ENV = "MOEMESH_TEXT_KEYS_FILE"
PREFIX = "aesgcm:"
_LINE = re.compile(r"^([A-Za-z0-9_.-]{1,32})\s+([0-9a-fA-F]{64})$")


class SealError(ValueError):
    """A key file or sealed value that cannot be used (names the file or the key id)."""


class TextSealer:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise SealError("the key ring is empty")
        self.current = keys[0][0]
        self._keys = {key_id: AESGCM(key) for key_id, key in keys}

    @classmethod
    def load(cls, path: Path | str | None = None) -> "TextSealer":
        """From `path`, else MOEMESH_TEXT_KEYS_FILE, else the default file (created with a fresh key if absent)."""
        path = Path(path or os.environ.get(KEYS_ENV) or _default_path())
        if not path.exists():
            _create(path)
        keys = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = _LINE.match(line.strip())
            if m is None:
                raise SealError(f"{path}:{n}: expected '<key id> <64 hex characters>'")
            keys.append((m.group(1), bytes.fromhex(m.group(2))))
        if not keys:
            raise SealError(f"{path}: no key in the file")
        return cls(keys)

    def seal(self, text: str, place: str) -> str:
        nonce = secrets.token_bytes(12)
        blob = nonce + self._keys[self.current].encrypt(nonce, text.encode(), place.encode())
        return f"{PREFIX}{self.current}:{base64.urlsafe_b64encode(blob).decode()}"

    def open(self, value: str, place: str) -> str:
        """The text of a sealed value; a value without the prefix is legacy plaintext and returned as it is."""
        if not value.startswith(PREFIX):
            return value
        key_id, _, data = value[len(PREFIX):].partition(":")
        aead = self._keys.get(key_id)
        if aead is None:
            raise SealError(f"key {key_id!r} is not in the key ring (rotated out too early?)")
        blob = base64.urlsafe_b64decode(data)
        return aead.decrypt(blob[:12], blob[12:], place.encode()).decode()

    def is_current(self, value: str) -> bool:
        return value.startswith(f"{PREFIX}{self.current}:")


def _default_path() -> Path:
    from moemesh.home import subdir

    path = subdir("secrets")
    path.chmod(0o700)
    return path / "metering_text_keys"


def _create(path: Path) -> None:
    """Writes a fresh key ring (0600) atomically; a concurrent creator's file wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"k1 {secrets.token_hex(32)}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    tmp.unlink()
