"""The tenant's own account through the public API: feedback on its completions and its usage report
(moemesh.v1.Chat/SubmitFeedback, POST /v1/feedback; moemesh.v1.Chat/GetUsage, GET /v1/usage).

The gateway only authenticates the key and forwards to metering *as that key's tenant* (Feedback.tenant,
GetUsageRequest.caller_tenant), so metering's isolation decides: another tenant's request id or usage is
PERMISSION_DENIED there, and its status (and message) reaches the caller unchanged. The RPCs live in the Chat service
rather than a service of their own so that the edge (Envoy: routes on /moemesh.v1.Chat/, JSON transcoding of
moemesh.v1.Chat) serves them over HTTP without any change.

With `--no-auth` nothing is metered, so both answer FAILED_PRECONDITION.
"""

from __future__ import annotations

import grpc

from moemesh.errors import ErrorStatus, ServiceError
from moemesh.v1 import chat_pb2, metering_pb2, metering_pb2_grpc

# How long SubmitFeedback waits for this gateway's still-pending commit of the rated request (the commit runs in the
# background after the answer is sent, so a client's immediate feedback could otherwise arrive before it).
COMMIT_WAIT_S = 5.0
RPC_TIMEOUT_S = 30.0


class NotMetered(ServiceError):
    status = ErrorStatus.FAILED_PRECONDITION

    def __init__(self) -> None:
        super().__init__("this gateway runs without auth (--no-auth): no usage is recorded, so there is no usage "
                         "report and no feedback")


class MeteringAccount:
    """Feedback and usage calls to metering on behalf of an authenticated tenant."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = metering_pb2_grpc.MeteringStub(channel)

    async def feedback(self, tenant: str, request: chat_pb2.SubmitFeedbackRequest) -> float:
        """Stores the feedback of `tenant`; returns the Unix seconds it was recorded at."""
        forwarded = metering_pb2.FeedbackRequest(tenant=tenant, request_id=request.request_id,
                                                 rating=request.rating, comment=request.comment)
        if request.HasField("task_completed"):
            forwarded.task_completed = request.task_completed
        response = await self._stub.Feedback(forwarded, timeout=RPC_TIMEOUT_S)
        return response.recorded_unix

    async def usage(self, tenant: str, query: chat_pb2.UsageQuery) -> metering_pb2.UsageReport:
        """The usage report of `query.tenant` (default: `tenant`), read as `tenant`."""
        return await self._stub.GetUsage(metering_pb2.GetUsageRequest(
            tenant=query.tenant or tenant, since_unix=query.since_unix, until_unix=query.until_unix,
            caller_tenant=tenant), timeout=RPC_TIMEOUT_S)


class AccountRpcs:
    """The account RPCs of ChatServicer (mixed in). Needs `self._tenant(context)` (authentication),
    `self._account` (a MeteringAccount, None without metering) and `self._completions` (pending commits)."""

    async def SubmitFeedback(self, request: chat_pb2.SubmitFeedbackRequest,
                             context) -> chat_pb2.SubmitFeedbackResponse:
        tenant = await self._tenant(context)
        if self._account is None:
            raise NotMetered()
        if not request.request_id:
            raise ValueError("request_id: empty; give the id of one of your completions (\"chatcmpl-...\")")
        await self._completions.committed(request.request_id, COMMIT_WAIT_S)
        recorded = await self._account.feedback(tenant.name, request)
        return chat_pb2.SubmitFeedbackResponse(request_id=request.request_id, recorded_unix=recorded)

    async def GetUsage(self, request: chat_pb2.UsageQuery, context) -> metering_pb2.UsageReport:
        tenant = await self._tenant(context)
        if self._account is None:
            raise NotMetered()
        if request.until_unix and request.until_unix <= request.since_unix:
            raise ValueError(f"until_unix: {request.until_unix} must be after since_unix {request.since_unix}")
        return await self._account.usage(tenant.name, request)
