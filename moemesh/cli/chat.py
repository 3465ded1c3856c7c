"""`moemesh chat TEXT`: one chat turn against the gateway (endpoint, API key and model default to the running
`moemesh up`'s status file). --stream prints text as it arrives; --json prints the whole response (id, model,
choices, usage) as one JSON object (with --stream: one JSON object per chunk)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="send one chat message to the mesh", description=__doc__)
    p.add_argument("text", help="the user message")
    p.add_argument("--endpoint", help="gateway address host:port (default: status file, else 127.0.0.1:50051)")
    p.add_argument("--api-key", help="API key (default: env MOEMESH_API_KEY, else the status file's dev key)")
    p.add_argument("--model", help="model id (default: the mesh's model)")
    p.add_argument("--system", help="a system message before the text")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate")
    # Greedy by default: a smoke-test command should answer the same way every time, and small models sampled at
    # the API's default temperature (1.0) ramble. The API itself keeps OpenAI's default.
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument("--status-file", type=Path, help="status file of `moemesh up` (default MOEMESH_HOME/run/status.json)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from moemesh.sdk import ChatClient, ChatStreamError

    params = dict(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed,
                  stop=ns.stop, system=ns.system)

    def as_json(message) -> str:
        return json.dumps(MessageToDict(message, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True), ensure_ascii=False)

    try:
        with ChatClient.from_status(ns.status_file, endpoint=ns.endpoint, model=ns.model, timeout=ns.timeout,
                                    api_key=ns.api_key or os.environ.get("MOEMESH_API_KEY")) as client:
            if not ns.stream:
                response = client.complete(ns.text, **params)
                print(as_json(response) if ns.json else response.choices[0].message.content)
                return 0
            for chunk in client.stream(ns.text, stream_usage=ns.json, **params):
                if ns.json:
                    print(as_json(chunk), flush=True)
                elif chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            if not ns.json:
                print()
            return 0
    except grpc.RpcError as exc:
        print(f"moemesh chat: {exc.code().name}: {exc.details()}", file=sys.stderr)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print("  is the mesh running? start it with `moemesh up` (or pass --endpoint)", file=sys.stderr)
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            print("  pass --api-key, or set MOEMESH_API_KEY", file=sys.stderr)
        return 1
    except ChatStreamError as exc:
        print(f"\nmoemesh chat: stream failed: {exc}", file=sys.stderr)
        return 1
