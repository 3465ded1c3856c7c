"""Every span of a completion ends and joins one tree, also for streams the gateway stops early or abandons (the
OTel client interceptor ends a stream's span only when its response iterator finishes)."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from span_capture import memory_exporter

from gateway_harness import AUTH, request


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return memory_exporter("gateway-tests")


def _tree(exporter: InMemorySpanExporter, request_id: str):
    spans = exporter.get_finished_spans()
    tagged = [s for s in spans if s.attributes.get("moemesh.request_id") == request_id]
    if not tagged:
        return set(), ["(no span yet)"]
    mine = [s for s in spans if s.context.trace_id == tagged[0].context.trace_id]
    ids = {s.context.span_id for s in mine}
    # The gateway's server span hangs under the test's client span, which an abandoned call never ends: not ours.
    orphans = [s.name for s in mine if s.parent is not None and s.parent.span_id not in ids
               and not s.name.startswith("/moemesh.v1.Chat/")]
    return {s.name for s in mine}, orphans


async def _settle(exporter, request_id, expected: set[str]):
    for _ in range(50):
        names, orphans = _tree(exporter, request_id)
        if expected <= names and not orphans:
            break
        await asyncio.sleep(0.05)
    return names, orphans


# The tokenizer's hop in a stream's trace: Encode always; DetokenizeStream too when the gateway cannot detokenize in
# its own process (a tokenizer service without Definition: the "stream" mesh).
DETOKENIZE = {"local": set(), "stream": {"/moemesh.v1.Tokenizer/DetokenizeStream"}}


KINDS = pytest.mark.parametrize(("mesh", "kind"), [("local", "local"), ("stream", "stream")], indirect=["mesh"])


@KINDS
async def test_stream_stopped_early_ends_every_span(mesh, kind, exporter) -> None:
    mesh.script("one two three four five six seven eight", delay=0.02)
    chunks = [c async for c in mesh.chat.StreamChatCompletion(request(stop=["four"]), metadata=AUTH)]
    expected = {"/moemesh.v1.Batcher/Generate", "/moemesh.v1.Tokenizer/Encode",
                "/moemesh.v1.Batcher/Cancel", "/moemesh.v1.Metering/Commit"} | DETOKENIZE[kind]
    names, orphans = await _settle(exporter, chunks[0].id, expected)
    assert expected <= names and not orphans and not (DETOKENIZE["stream"] - expected) & names


@KINDS
async def test_abandoned_stream_ends_every_span(mesh, kind, exporter) -> None:
    mesh.script(" ".join(["word"] * 40), delay=0.05)
    call = mesh.chat.StreamChatCompletion(request(), metadata=AUTH)
    first = None
    async for chunk in call:
        first = first or chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            break
    call.cancel()
    await asyncio.wait_for(mesh.metering.committed.wait(), 5)
    expected = {"/moemesh.v1.Batcher/Generate", "/moemesh.v1.Tokenizer/Encode"} | DETOKENIZE[kind]
    names, orphans = await _settle(exporter, first, expected)
    assert expected <= names and not orphans and not (DETOKENIZE["stream"] - expected) & names
