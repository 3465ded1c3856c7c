"""Traffic that gives every chart of the monitoring dashboard something to show: three tenants (one near its monthly
budget, one over its rpm limit), streamed and unary chats, feedback with ratings and task completion, and a few
refused requests (wrong key, invalid temperature, over quota) for the error-rate chart."""

from __future__ import annotations

import itertools
import threading
import time

import grpc

from moemesh.sdk import ChatClient, ChatStreamError

from mesh_harness import RunningMesh
from metering_harness import Account, create_tenant

# name -> `moemesh tenants create` flags; acme's budget is a few dozen tiny requests (metering's default prices)
TENANTS = {"acme": ("--budget-usd", "0.0003"), "globex": ("--rpm", "20"), "initech": ()}


class Traffic:
    """Chat threads (one per tenant) plus a trickle of bad requests, until stop(); counts what happened."""

    def __init__(self, mesh: RunningMesh) -> None:
        self.mesh = mesh
        self.keys = {name: create_tenant(mesh, name, *flags) for name, flags in TENANTS.items()}
        self.ok, self.refused = 0, 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._chat, args=(n,), daemon=True) for n in self.keys]
        self._threads.append(threading.Thread(target=self._bad, daemon=True))

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _chat(self, tenant: str) -> None:
        key, model = self.keys[tenant], self.mesh.status["model"]
        with ChatClient(self.mesh.gateway, key, model=model, timeout=120) as chat, \
                Account(self.mesh.gateway, key) as account:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                try:
                    request_id = self._one(chat, tenant, i)
                    self.ok += 1
                    # Ratings differ per tenant so that the satisfaction chart has distinct lines.
                    account.feedback(request_id, rating=1 + (len(tenant) + i) % 5, task_completed=i % 3 != 0)
                except (grpc.RpcError, ChatStreamError):
                    self.refused += 1
                    time.sleep(0.5)

    def _one(self, chat: ChatClient, tenant: str, i: int) -> str:
        prompt = f"{tenant} asks question {i}"
        if i % 2:
            chunks = list(chat.stream(prompt, max_tokens=6, stop=[" the"]))
            return chunks[0].id
        return chat.complete(prompt, max_tokens=4 + i % 4).id

    def _bad(self) -> None:
        """Every 2 s one refused request: a wrong key (UNAUTHENTICATED) or an invalid temperature (INVALID_ARGUMENT)."""
        for i in itertools.count():
            if self._stop.wait(2.0):
                return
            key = "mm-not-a-key" if i % 2 else self.keys["initech"]
            try:
                with ChatClient(self.mesh.gateway, key, model=self.mesh.status["model"], timeout=30) as chat:
                    chat.complete("bad", max_tokens=2, temperature=9.0)
            except grpc.RpcError:
                pass
