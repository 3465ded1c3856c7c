"""`moemesh chat TEXT`: one chat turn against the gateway (endpoint, API key and model default to the running
`moemesh up`'s status file). `moemesh chat -` reads the message from standard input, `--file PATH` from a file (for
prompts too long for a command line). --stream prints text as it arrives; --json prints the whole response (id,
model, choices, usage) as one JSON object (with --stream: one JSON object per chunk).

The answer is at most --max-tokens long (default: the gateway's, 256 tokens); when it stops there, stderr says so
(finish_reason "length")."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moemesh.cli.args import INT32_MAX, INT64, finite_float, int_in, utf8_text

# This module is imported for `moemesh chat --help`: grpc, protobuf and the SDK are imported in run() only.
DEFAULT_MAX_TOKENS = 256  # the gateway's default (MOEMESH_GATEWAY_DEFAULT_MAX_TOKENS); shown in --help


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="send one chat message to the mesh", description=__doc__)
    p.add_argument("text", nargs="?", type=utf8_text, help="the user message; '-' reads it from standard input")
    p.add_argument("--file", type=Path, help="read the user message from this file (UTF-8)")
    p.add_argument("--endpoint", type=utf8_text,
                   help="gateway address host:port (default: status file, else 127.0.0.1:50051)")
    p.add_argument("--api-key", type=utf8_text, help="API key (default: env MOEMESH_API_KEY, else the status file's)")
    p.add_argument("--model", type=utf8_text, help="model id (default: the mesh's model)")
    p.add_argument("--system", type=utf8_text, help="a system message before the text")
    p.add_argument("--max-tokens", type=int_in(1, INT32_MAX),
                   help=f"most tokens to generate (default: the gateway's, {DEFAULT_MAX_TOKENS})")
    # Greedy by default: a smoke-test command should answer the same way every time, and small models sampled at
    # the API's default temperature (1.0) ramble. The API itself keeps OpenAI's default.
    p.add_argument("--temperature", type=finite_float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=finite_float)
    p.add_argument("--seed", type=int_in(*INT64))
    p.add_argument("--stop", action="append", type=utf8_text, help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument("--status-file", type=Path,
                   help="status file of `moemesh up` (default MOEMESH_HOME/run/status.json)")
    p.add_argument("--timeout", type=finite_float, default=600.0, help="seconds to wait for the answer")
    # mTLS to a gateway that speaks it; MOEMESH_MTLS=1 alone uses the mesh's dev certificate (moemesh/certs/client_tls)
    p.add_argument("--ca", type=Path, help="CA certificate of the gateway's mTLS")
    p.add_argument("--cert", type=Path, help="client certificate for mTLS (with --key)")
    p.add_argument("--key", type=Path, help="private key of --cert")
    p.set_defaults(func=run, parser=p)


def read_message(ns: argparse.Namespace) -> str:
    """The user message from TEXT, '-' (stdin) or --file; exits 2 (usage error, one line) when it is missing,
    doubly given, unreadable or not UTF-8."""
    parser: argparse.ArgumentParser = ns.parser
    if (ns.text is None) == (ns.file is None):
        parser.error("give the message as TEXT, '-' (standard input) or --file PATH (exactly one)")
    if ns.file is not None:
        source, read = f"--file {ns.file}", ns.file.read_bytes
    elif ns.text == "-":
        source, read = "standard input ('-')", sys.stdin.buffer.read
    else:
        return ns.text
    try:
        text = read().decode("utf-8")
    except OSError as exc:
        parser.error(f"{source}: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        parser.error(f"{source}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})")
    if not text.strip():
        parser.error(f"{source}: the message is empty")
    return text


def run(ns: argparse.Namespace) -> int:
    import grpc

    from moemesh.sdk import ChatClient, ChatStreamError

    text = read_message(ns)
    params = dict(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed,
                  stop=ns.stop, system=ns.system)
    try:
        with ChatClient.from_status(ns.status_file, endpoint=ns.endpoint, model=ns.model, timeout=ns.timeout,
                                    api_key=ns.api_key or os.environ.get("MOEMESH_API_KEY"), ca=ns.ca,
                                    cert=ns.cert, key=ns.key) as client:
            finish, tokens = (_stream if ns.stream else _complete)(client, text, params, ns.json)
    except grpc.RpcError as exc:
        print(f"moemesh chat: {exc.code().name}: {exc.details()}{_hint(exc.code().name)}", file=sys.stderr)
        return 1
    except ChatStreamError as exc:
        print(f"\nmoemesh chat: stream failed: {exc}", file=sys.stderr)
        return 1
    if finish == "length":
        print(f"moemesh chat: finish_reason length: the answer stopped at max_tokens ({tokens} tokens); pass a "
              f"larger --max-tokens for more", file=sys.stderr)
    return 0


def _hint(code: str) -> str:
    return {"UNAVAILABLE": " (is the mesh running? start it with `moemesh up`, or pass --endpoint)",
            "UNAUTHENTICATED": " (pass --api-key, or set MOEMESH_API_KEY)"}.get(code, "")


def _as_json(message) -> str:
    import json

    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True), ensure_ascii=False)


def _complete(client, text: str, params: dict, as_json: bool) -> tuple[str, int]:
    """Prints the answer; returns its finish reason and length in tokens."""
    response = client.complete(text, **params)
    print(_as_json(response) if as_json else response.choices[0].message.content)
    return response.choices[0].finish_reason, response.usage.completion_tokens


def _stream(client, text: str, params: dict, as_json: bool) -> tuple[str, int]:
    """Prints the answer as it arrives; returns its finish reason and length in tokens (from the usage chunk,
    always asked for: the gateway's default max_tokens is not known here)."""
    finish, tokens = "", 0
    for chunk in client.stream(text, stream_usage=True, **params):
        if as_json:
            print(_as_json(chunk), flush=True)
        if chunk.HasField("usage"):
            tokens = chunk.usage.completion_tokens
        if chunk.choices:
            finish = chunk.choices[0].finish_reason or finish
            if not as_json and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
    if not as_json:
        print()
    return finish, tokens
