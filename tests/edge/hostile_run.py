"""Sending hostile cases to the edge over real sockets and judging the answers (see hostile_cases.py).

    probe = Probe(url, ca_cert, model, api_key)
    verdict = probe.http(case)          # or probe.grpc(case)
    assert verdict.ok, verdict
    assert probe.valid_http() and probe.valid_grpc()   # the edge still serves a valid request
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import grpc
import httpx2

from hostile_cases import SERVER_FAULTS, GrpcCase, HttpCase, base
from hostile_grpc import valid_request

CHAT = "/moemesh.v1.Chat/"


@dataclass(frozen=True)
class Verdict:
    kind: str
    outcome: str  # "rejected", "accepted", "reset", or what went wrong: "server_fault", "unnamed", "not_rejected"
    ok: bool
    detail: str = ""


def _names(message: str, param: str | None, names: tuple[str, ...]) -> bool:
    return not names or any(n in message or n == param for n in names)


def judge_http(case: HttpCase, status: int, body: bytes, headers) -> Verdict:
    detail = f"{status} {body[:300]!r}"
    if status >= 500:
        return Verdict(case.kind, "server_fault", False, detail)
    grpc_status = headers.get("grpc-status")
    if grpc_status is not None and status == 200:  # a gRPC answer (the case claimed content-type application/grpc)
        code = grpc.StatusCode.OK.name if grpc_status == "0" else next(
            (c.name for c in grpc.StatusCode if str(c.value[0]) == grpc_status), "UNKNOWN")
        ok = code not in SERVER_FAULTS
        return Verdict(case.kind, "rejected" if code != "OK" else "accepted", ok, detail)
    if status < 400:
        return Verdict(case.kind, "accepted" if not case.reject else "not_rejected", not case.reject, detail)
    try:
        error = json.loads(body)["error"]
        message, param = str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        return Verdict(case.kind, "unnamed", False, "no OpenAI error body: " + detail)
    if not message.strip() or not _names(message, param, case.names):
        return Verdict(case.kind, "unnamed", False, f"expected one of {case.names}: " + detail)
    return Verdict(case.kind, "rejected", True, detail)


def judge_grpc(case: GrpcCase, code: grpc.StatusCode, details: str) -> Verdict:
    detail = f"{code.name} {details[:300]!r}"
    if case.reset_ok and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL) and (
            "GOAWAY" in details or "RST_STREAM" in details or "Stream removed" in details):
        return Verdict(case.kind, "reset", True, detail)  # HTTP/2's answer to oversized headers
    if code.name in SERVER_FAULTS:
        return Verdict(case.kind, "server_fault", False, detail)
    if code == grpc.StatusCode.OK:
        return Verdict(case.kind, "accepted" if not case.reject else "not_rejected", not case.reject, detail)
    if not details.strip() or not _names(details, None, case.names):
        return Verdict(case.kind, "unnamed", False, f"expected one of {case.names}: " + detail)
    return Verdict(case.kind, "rejected", True, detail)


@dataclass
class Probe:
    url: str
    ca_cert: str
    model: str
    api_key: str
    tally: Counter = field(default_factory=Counter)
    failures: list[Verdict] = field(default_factory=list)
    secrets: tuple[bytes, ...] = ()  # another tenant's data: in any answer it is a cross-tenant leak

    def __post_init__(self) -> None:
        self._http = httpx2.Client(verify=self.ca_cert, timeout=120)
        creds = grpc.ssl_channel_credentials(open(self.ca_cert, "rb").read())
        self._channel = grpc.secure_channel(self.url.removeprefix("https://"), creds)

    def close(self) -> None:
        self._http.close()
        self._channel.close()

    def _leak(self, kind: str, answer: bytes) -> Verdict | None:
        found = [s for s in self.secrets if s and s in answer]
        return Verdict(kind, "cross_tenant_leak", False, f"answer holds {found[0]!r}") if found else None

    def _record(self, verdict: Verdict) -> Verdict:
        self.tally[(verdict.kind, verdict.outcome)] += 1
        if not verdict.ok:
            self.failures.append(verdict)
        return verdict

    def http(self, case: HttpCase) -> Verdict:
        headers = {"content-type": "application/json", **case.headers}
        try:
            response = self._http.request(case.method, self.url + case.path, content=case.body, headers=headers)
        except httpx2.HTTPError as exc:  # the edge closed the connection: judged like a server fault
            self._http.close()
            self._http = httpx2.Client(verify=self.ca_cert, timeout=120)
            return self._record(Verdict(case.kind, "server_fault", False, f"{type(exc).__name__}: {exc}"))
        leak = self._leak(case.kind, response.content)
        return self._record(leak or judge_http(case, response.status_code, response.content, response.headers))

    def grpc(self, case: GrpcCase) -> Verdict:
        method = CHAT + (case.method or ("StreamChatCompletion" if case.stream else "CreateChatCompletion"))
        kwargs = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        try:
            if case.stream:
                answers = list(self._channel.unary_stream(method, **kwargs)(case.request, metadata=case.metadata,
                                                                           timeout=120))
            else:
                answers = [self._channel.unary_unary(method, **kwargs)(case.request, metadata=case.metadata,
                                                                      timeout=120)]
        except grpc.RpcError as exc:
            leak = self._leak(case.kind, (exc.details() or "").encode())
            return self._record(leak or judge_grpc(case, exc.code(), exc.details() or ""))
        return self._record(self._leak(case.kind, b"".join(answers)) or judge_grpc(case, grpc.StatusCode.OK, ""))

    def valid_http(self) -> bool:
        response = self._http.post(self.url + "/v1/chat/completions", json=base(self.model),
                                   headers={"authorization": f"Bearer {self.api_key}"})
        return response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")

    def valid_grpc(self) -> bool:
        stub = self._channel.unary_unary(CHAT + "CreateChatCompletion",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=lambda b: b)
        stub(valid_request(self.model), metadata=(("authorization", f"Bearer {self.api_key}"),), timeout=120)
        return True
