"""Prompt logprobs end to end on the tiny MoE mesh (`moemesh up --edge`: gateway, batcher, router, expert shards over
real gRPC): the typed gRPC field equals log_softmax of the model's own forward over the prompt; the official openai
client through Envoy gets OpenAI's echo shape (prompt tokens first, the first one's logprob null) with the same
numbers; a repeated prompt that asks is computed again (no prefix-cache hit)."""

from __future__ import annotations

import grpc
import openai
import torch

from edge_harness import EdgeMesh
from moemesh.v1 import chat_pb2, chat_pb2_grpc

PROMPT = ("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill and the birds "
          "sing in the tall oak tree")


def _grpc_completion(mesh: EdgeMesh, **fields) -> chat_pb2.Completion:
    with grpc.insecure_channel(mesh.status["gateway"]) as channel:
        return chat_pb2_grpc.ChatStub(channel).CreateCompletion(
            chat_pb2.CompletionRequest(model=mesh.model, prompt=PROMPT, max_tokens=1, temperature=0, **fields),
            metadata=(("authorization", f"Bearer {mesh.api_key}"),), timeout=120)


def _reference(model_dir: str, ids: list[int]) -> torch.Tensor:
    """[L - 1] log P(ids[q] | ids[:q]) from an in-process engine on the same checkpoint."""
    from moemesh.runtime.engine import Engine

    logits = Engine.load(model_dir, kv_blocks=16).forward_logits([ids])[0]
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def test_prompt_logprobs_through_grpc_and_the_edge(edge_mesh: EdgeMesh) -> None:
    typed = _grpc_completion(edge_mesh, prompt_logprobs=2)
    entries = typed.choices[0].prompt_logprobs
    ids = [e.token_id for e in entries]
    assert len(ids) == typed.usage.prompt_tokens > 16  # longer than a KV block: the prefix cache could hit
    assert not entries[0].HasField("logprob") and all(e.HasField("logprob") for e in entries[1:])
    assert all(len(e.top_logprobs) == 2 for e in entries[1:])
    got = torch.tensor([e.logprob for e in entries[1:]])
    torch.testing.assert_close(got, _reference(edge_mesh.status["model"], ids), atol=1e-3, rtol=0)

    plain = _grpc_completion(edge_mesh)  # not asking: the prompt's blocks come from the prefix cache
    assert plain.usage.prompt_tokens_details.cached_tokens >= 16
    again = _grpc_completion(edge_mesh, prompt_logprobs=0)  # asking: computed again, same numbers
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert [e.logprob for e in again.choices[0].prompt_logprobs] == [e.logprob for e in entries]

    client = openai.OpenAI(base_url=f"{edge_mesh.url}/v1", api_key=edge_mesh.api_key, max_retries=0, timeout=120,
                           http_client=openai.DefaultHttpxClient(verify=edge_mesh.ca_cert))
    reply = client.completions.create(model=edge_mesh.model, prompt=PROMPT, max_tokens=2, temperature=0, echo=True,
                                      logprobs=1)
    choice = reply.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    n = len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + reply.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:n]), got, atol=1e-6, rtol=0)
    assert all(len(alts) == 1 for alts in lp.top_logprobs[1:])
    # lm-eval's loglikelihood request: echo, max_tokens 0: the prompt and its logprobs only
    scored = client.completions.create(model=edge_mesh.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == lp.token_logprobs[1:n]


def test_chat_prompt_logprobs_extension_through_the_edge(edge_mesh: EdgeMesh) -> None:
    client = openai.OpenAI(base_url=f"{edge_mesh.url}/v1", api_key=edge_mesh.api_key, max_retries=0, timeout=120,
                           http_client=openai.DefaultHttpxClient(verify=edge_mesh.ca_cert))
    reply = client.chat.completions.create(model=edge_mesh.model, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=1, extra_body={"prompt_logprobs": 1})
    entries = reply.model_extra["prompt_logprobs"]
    assert len(entries) == reply.usage.prompt_tokens
    assert "logprob" not in entries[0] and entries[1]["logprob"] < 0 and len(entries[1]["top_logprobs"]) == 1


def test_the_sdk_exposes_prompt_logprobs_and_completions(edge_mesh: EdgeMesh) -> None:
    from moemesh.sdk import ChatClient, ChatModel

    with ChatClient(edge_mesh.status["gateway"], edge_mesh.api_key, model=edge_mesh.model) as client:
        typed = _grpc_completion(edge_mesh, prompt_logprobs=0)
        done = client.text_complete(PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=0)
        assert done.choices[0].text.startswith(PROMPT)
        numbers = list(done.choices[0].logprobs.numeric_token_logprobs[1:len(typed.choices[0].prompt_logprobs)])
        assert numbers == [e.logprob for e in typed.choices[0].prompt_logprobs[1:]]
    with ChatModel(edge_mesh.model, endpoint=edge_mesh.status["gateway"], api_key=edge_mesh.api_key) as model:
        reply = model.chat(PROMPT, max_tokens=1, prompt_logprobs=0)
    assert len(reply.prompt_logprobs) == reply.usage.prompt_tokens
    assert reply.prompt_logprobs[0][1] is None and all(lp is not None and lp < 0 for _, lp in reply.prompt_logprobs[1:])
