"""Issue 16, "the first hour", on real processes and sockets: the edge refuses bodies it must not guess about (Envoy
in front of the fake gateway), and the real mesh (`moemesh up --edge`, tiny MoE, context window 2048) answers in the
user's terms: over-long prompts name `messages` (OpenAI's `context_length_exceeded`), empty content is refused,
`moemesh chat` reads long prompts from stdin or --file and says when an answer was cut at max_tokens, and `up` told
on the console how the start went."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from edge_clients import http_client
from edge_fake_chat import GOOD_KEY
from edge_harness import ROOT, EdgeMesh
from moemesh.sdk import ChatClient

CHAT = "/v1/chat/completions"
TOO_LONG = "word " * 3000  # about 3000 tokens: beyond the tiny model's 2048


def _post(url: str, home: Path, key: str, body: bytes, content_type: str | None):
    headers = {"authorization": f"Bearer {key}", **({"content-type": content_type} if content_type else {})}
    with http_client(home) as client:
        return client.post(f"{url}{CHAT}", content=body, headers=headers)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None,
                                          "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_json_is_415(edge, edge_home, content_type) -> None:
    response = _post(edge.url, edge_home, GOOD_KEY, b'{"model": "tiny", "messages": []}', content_type)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "UNSUPPORTED_MEDIA_TYPE" and "application/json" in error["message"]


def test_json_with_a_charset_parameter_is_still_json(edge, edge_home) -> None:
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hello edge"}]}'
    response = _post(edge.url, edge_home, GOOD_KEY, body, "Application/JSON; charset=utf-8")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("bad", [b"\xff", b"caf\xe9!", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82"])
def test_a_body_that_is_not_utf8_gets_one_line(edge, edge_home, bad) -> None:
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "ok ' + bad + b'"}]}'
    response = _post(edge.url, edge_home, GOOD_KEY, body, "application/json")
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("body: not valid UTF-8 (byte 0x") and "\n" not in message, message
    good = "ok ünïcödé ✓ 𝄞".encode()
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + good + b'"}]}'
    assert _post(edge.url, edge_home, GOOD_KEY, body, "application/json").status_code == 200


# --- the real mesh -----------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_up_showed_each_service_and_how_long_the_start_took(edge_mesh: EdgeMesh) -> None:
    out = edge_mesh.output.read_text()
    for name in ("metering", "tokenizer", "expert-0", "expert-1", "router", "batcher", "gateway"):
        assert f"  ok  {name}" in out, out
    assert "all 7 services SERVING after" in out and "mesh SERVING" in out, out


@pytest.mark.e2e
@pytest.mark.slow
def test_a_prompt_beyond_the_context_window_names_messages(edge_mesh: EdgeMesh) -> None:
    body = {"model": edge_mesh.model, "messages": [{"role": "user", "content": TOO_LONG}], "max_tokens": 2}
    with http_client(edge_mesh.home) as client:
        for path in (CHAT, CHAT + ":stream"):
            response = client.post(f"{edge_mesh.url}{path}", json=body,
                                   headers={"authorization": f"Bearer {edge_mesh.api_key}"})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "messages" and error["code"] == "context_length_exceeded", error
            assert error["message"].startswith("messages: ") and "context window" in error["message"]
    with ChatClient(edge_mesh.status["gateway"], edge_mesh.api_key) as client, pytest.raises(grpc.RpcError) as err:
        client.complete(TOO_LONG, max_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("messages: ")
    assert ("error-code", "context_length_exceeded") in tuple(err.value.trailing_metadata())


@pytest.mark.e2e
@pytest.mark.slow
def test_empty_content_is_refused_naming_it(edge_mesh: EdgeMesh) -> None:
    body = {"model": edge_mesh.model, "messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": ""}]}
    with http_client(edge_mesh.home) as client:
        response = client.post(f"{edge_mesh.url}{CHAT}", json=body,
                               headers={"authorization": f"Bearer {edge_mesh.api_key}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[1].content", response.text


def _chat(mesh: EdgeMesh, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh.cli.main", "chat", *args], env=mesh.env(), cwd=ROOT,
                          input=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
@pytest.mark.slow
def test_chat_reads_the_message_from_stdin_or_a_file(edge_mesh: EdgeMesh, tmp_path: Path) -> None:
    argv_answer = _chat(edge_mesh, "--max-tokens", "3", "Tell me a story")
    assert argv_answer.returncode == 0 and argv_answer.stdout, argv_answer.stderr  # the tiny model's text: any
    from_stdin = _chat(edge_mesh, "--max-tokens", "3", "-", stdin="Tell me a story")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Tell me a story")
    from_file = _chat(edge_mesh, "--max-tokens", "3", "--file", str(prompt))
    assert from_stdin.stdout == from_file.stdout == argv_answer.stdout  # greedy: the same message, the same answer
    prompt.write_text("word " * 40_000)  # 200 KB: more than a shell takes as one argument
    too_long = _chat(edge_mesh, "--file", str(prompt))
    assert too_long.returncode == 1 and len(too_long.stderr.strip().splitlines()) == 1, too_long.stderr
    assert "INVALID_ARGUMENT: messages: " in too_long.stderr and "context window" in too_long.stderr


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("--stream",)])
def test_chat_says_on_stderr_when_the_answer_was_cut_at_max_tokens(edge_mesh: EdgeMesh, mode) -> None:
    cut = _chat(edge_mesh, *mode, "--max-tokens", "2", "Tell me a story")  # the tiny model never says EOS this soon
    assert cut.returncode == 0 and cut.stdout, cut.stderr
    assert "finish_reason length" in cut.stderr and "(2 tokens)" in cut.stderr and "--max-tokens" in cut.stderr
    assert "finish_reason" not in cut.stdout
