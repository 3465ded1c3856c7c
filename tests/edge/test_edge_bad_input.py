"""Issue 17's bad input on the paths test_edge_structured.py leaves out, through the real edge with the official openai
client: /v1/completions with n above the gateway's maximum, prompt scoring out of range or on a stream; each a 400
whose `param` names the field."""

from __future__ import annotations

import openai
import pytest

from edge_harness import EdgeMesh


@pytest.mark.parametrize(("args", "param"), [
    ({"n": 99}, "n"),
    ({"extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
    ({"echo": True, "stream": True}, "echo"),
])
def test_bad_completion_input_is_a_400_naming_the_field(edge_mesh: EdgeMesh, args: dict, param: str) -> None:
    client = openai.OpenAI(base_url=f"{edge_mesh.url}/v1", api_key=edge_mesh.api_key, max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(verify=edge_mesh.ca_cert))
    with pytest.raises(openai.BadRequestError) as err:
        reply = client.completions.create(model=edge_mesh.model, prompt="Hello", max_tokens=2, **args)
        list(reply) if args.get("stream") else None
    assert err.value.body["param"] == param, err.value.body
