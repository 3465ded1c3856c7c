"""moemesh.v1.Tokenizer over gRPC: protobuf <-> plain values only; the work is in catalog.py / stream.py."""

from __future__ import annotations

import json

import grpc

from moemesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer.catalog import TokenizerCatalog, check_ids
from services.tokenizer.stream import DetokenizeSession

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name


def _messages(chat: tokenizer_pb2.ChatInput) -> list[dict]:
    out = []
    for m in chat.messages:
        message = {"role": m.role, "content": m.content}
        if m.HasField("name"):
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": c.type or "function", "function": {
                "name": c.function.name, "arguments": c.function.arguments}} for c in m.tool_calls]
        if m.HasField("tool_call_id"):
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _tools(chat: tokenizer_pb2.ChatInput) -> list[dict] | None:
    if not chat.tools_json:
        return None
    tools = json.loads(chat.tools_json)
    if not isinstance(tools, list):
        raise ValueError("chat.tools_json: must be a JSON array of tools")
    return tools


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, catalog: TokenizerCatalog) -> None:
        self._catalog = catalog
        self._definitions: dict[int, str] = {}  # id(ChatTokenizer) -> its tokenizer.json (serialized once)

    async def Encode(self, request: tokenizer_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        tokenizer = self._catalog.get(request.model)
        kind = request.WhichOneof("input")
        if kind == "text":
            return tokenizer_pb2.EncodeResponse(ids=tokenizer.encode(request.text))
        if kind == "chat":
            if not request.chat.messages:
                raise ValueError("chat.messages: at least one message is required")
            ids, rendered = tokenizer.encode_chat(_messages(request.chat), request.chat.add_generation_prompt,
                                                  tools=_tools(request.chat))
            return tokenizer_pb2.EncodeResponse(ids=ids, rendered=rendered)
        raise ValueError("input: set either text or chat")

    async def Decode(self, request: tokenizer_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        tokenizer = self._catalog.get(request.model)
        ids = check_ids(tokenizer, request.ids)
        return tokenizer_pb2.DecodeResponse(text=tokenizer.decode(ids, request.skip_special_tokens))

    async def DetokenizeStream(self, request_iterator, context: grpc.aio.ServicerContext):
        """One response per request message; when the client closes its side, one more response with the held-back
        remainder if there is any."""
        session: DetokenizeSession | None = None
        tokenizer = None
        async for request in request_iterator:
            if session is None:
                tokenizer = self._catalog.get(request.model)
                session = DetokenizeSession(tokenizer, skip_special_tokens=request.skip_special_tokens)
            piece = session.feed(check_ids(tokenizer, request.ids))
            yield tokenizer_pb2.DetokenizeResponse(text=piece.text, token_texts=piece.token_texts)
        if session is not None:
            rest = session.finish()
            if rest:
                yield tokenizer_pb2.DetokenizeResponse(text=rest)

    async def Info(self, request: tokenizer_pb2.TokenizerInfoRequest, context: grpc.aio.ServicerContext):
        tokenizer = self._catalog.get(request.model)
        info = tokenizer_pb2.TokenizerInfo(
            model=request.model or self._catalog.models[0], vocab_size=tokenizer.vocab_size,
            eos_token_ids=tokenizer.eos_token_ids, has_chat_template=tokenizer.has_chat_template,
            template_supports_tools=tokenizer.template_supports_tools,
            generation_defaults=common_pb2.SamplingDefaults(**tokenizer.generation_defaults),
        )
        if tokenizer.bos_token_id is not None:
            info.bos_token_id = tokenizer.bos_token_id
        return info

    async def Pieces(self, request: tokenizer_pb2.PiecesRequest, context: grpc.aio.ServicerContext):
        tokenizer = self._catalog.get(request.model)
        pieces = [tokenizer.token_piece(i) for i in check_ids(tokenizer, request.ids)]
        return tokenizer_pb2.PiecesResponse(
            pieces=[tokenizer_pb2.TokenPiece(id=p.token_id, text=p.text, bytes=p.bytes) for p in pieces]
        )

    async def Definition(self, request: tokenizer_pb2.TokenizerDefinitionRequest, context: grpc.aio.ServicerContext):
        """The tokenizer.json a caller needs to detokenize in its own process (the gateway does, instead of a
        DetokenizeStream message per token)."""
        tokenizer = self._catalog.get(request.model)
        if id(tokenizer) not in self._definitions:
            self._definitions[id(tokenizer)] = tokenizer.tokenizer.to_str()
        return tokenizer_pb2.TokenizerDefinition(model=request.model or self._catalog.models[0],
                                                 tokenizer_json=self._definitions[id(tokenizer)])


def add_to_server(servicer: TokenizerServicer, server: grpc.aio.Server) -> list[str]:
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server)
    return [SERVICE_NAME]
