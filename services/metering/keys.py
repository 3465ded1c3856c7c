"""Redis key names. Every key of one tenant carries the hash tag `{tenant}`, so that one Lua script touches only
keys of one Redis Cluster slot; the few global keys are listed first.

Tenant names are validated (`TENANT_NAME`) before they reach a key: no braces, colons or spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")

TENANTS = "mm:tenants"  # set of tenant names


def api_key(digest: str) -> str:
    """Hash {tenant, key_id} of one live API key, by the HMAC of the secret."""
    return f"mm:apikey:{digest}"


@dataclass(frozen=True)
class TenantKeys:
    """The keys of one tenant, in the order the Lua scripts take them (KEYS[1..9])."""

    tenant: str

    def _k(self, what: str) -> str:
        return f"mm:{{{self.tenant}}}:{what}"

    @property
    def config(self) -> str:  # hash: namespace, created_ms, weight, priority, rpm, tpm, concurrency, budget_nano
        return self._k("config")

    @property
    def inflight(self) -> str:  # zset: request id -> reservation expiry (ms)
        return self._k("inflight")

    @property
    def reservations(self) -> str:  # hash: request id -> "<tokens> <nano> <month>"
        return self._k("res")

    @property
    def window(self) -> str:  # zset: request id -> admission time (ms), the last minute's admissions
        return self._k("win")

    @property
    def window_tokens(self) -> str:  # hash: request id -> tokens counted for it in the window
        return self._k("wintok")

    @property
    def state(self) -> str:  # hash: win_tokens, <YYYY-MM>:spent, <YYYY-MM>:held (n$)
        return self._k("state")

    @property
    def done(self) -> str:  # hash: committed request id -> "<price n$> <cost p$> <ledger id>"
        return self._k("done")

    @property
    def done_at(self) -> str:  # zset: committed request id -> commit time (ms), to forget old ids
        return self._k("doneat")

    @property
    def ledger(self) -> str:  # stream: one entry per committed request, id = commit time in ms
        return self._k("ledger")

    @property
    def keys(self) -> str:  # hash: key id -> JSON {digest, created_ms, revoked_ms}
        return self._k("keys")

    @property
    def feedback(self) -> str:  # hash: request id -> JSON {rating, completed, comment, at_ms}
        return self._k("feedback")

    def script_keys(self) -> list[str]:
        return [self.config, self.inflight, self.reservations, self.window, self.window_tokens, self.state,
                self.done, self.done_at, self.ledger]
