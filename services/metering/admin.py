"""Admin credentials for metering's tenant administration RPCs (CreateTenant, GetTenant, ListTenants, SetQuota,
IssueKey, RevokeKey, and GetUsage/ExportUsage of any tenant).

Anyone who reaches metering's port could otherwise create tenants, raise quotas or mint API keys. Those calls must
carry the admin token in metadata `x-moemesh-admin-token`. The token comes from `MOEMESH_ADMIN_TOKEN` (a Kubernetes
Secret), else from `MOEMESH_HOME/secrets/admin_token` (created 0600 with 32 random bytes, hex, if absent), so a local
operator on the same MOEMESH_HOME has it and nobody else does. The CLI (`moemesh tenants`) talks to Redis directly
and needs no token. The gateway's tenant calls (Feedback, GetUsage with caller_tenant) need none: they are scoped to
the caller's tenant.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from services.metering.errors import PermissionDenied, Unauthenticated
from services.metering.secret import _create

ADMIN_ENV = "MOEMESH_ADMIN_TOKEN"
METADATA_KEY = "x-moemesh-admin-token"


def default_token_path() -> Path:
    from moemesh.home import subdir

    path = subdir("secrets")
    path.chmod(0o700)
    return path / "admin_token"


def load_or_create_admin_token(path: Path | None = None, env: dict | None = None) -> str:
    env = os.environ if env is None else env
    if env.get(ADMIN_ENV):
        token = env[ADMIN_ENV].strip()
        if len(token) < 32:
            raise ValueError(f"{ADMIN_ENV}: {len(token)} characters is too short (at least 32)")
        return token
    path = Path(path) if path else default_token_path()
    if not path.exists():
        _create(path)
    return path.read_text().strip()


class AdminGuard:
    """Checks the token presented with an admin call; no configured token: every admin call is refused."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    def check(self, presented: str | None) -> None:
        if self._token is None:
            raise PermissionDenied("admin operations are disabled on this metering (no admin token configured)")
        if not presented:
            raise Unauthenticated(f"admin operation: send the admin token in metadata {METADATA_KEY!r} "
                                  f"(MOEMESH_HOME/secrets/admin_token or ${ADMIN_ENV})")
        if not hmac.compare_digest(presented.encode(), self._token):
            raise PermissionDenied("admin operation: wrong admin token")
