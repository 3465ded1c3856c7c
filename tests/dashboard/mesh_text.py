"""Exposition text as the mesh's services write it (names and labels as in services/*/metrics.py), for snapshots
built without a running mesh."""

from __future__ import annotations

from moemesh.dashboard.query import Snapshot
from moemesh.dashboard.scrape import parse_into

CHAT = 'method="/moemesh.v1.Chat/CreateChatCompletion",service="gateway"'


def mesh_snapshot(t: float, n: int) -> Snapshot:
    """The mesh after `n` requests of tenant acme (n // 10 of them UNAVAILABLE), 10 tokens each."""
    snap = Snapshot(t)
    texts = {
        "gateway": f"""# TYPE moemesh_rpc_server_handled counter
moemesh_rpc_server_handled_total{{code="OK",{CHAT}}} {n - n // 10}
moemesh_rpc_server_handled_total{{code="UNAVAILABLE",{CHAT}}} {n // 10}
moemesh_rpc_server_handled_total{{code="OK",method="/grpc.health.v1.Health/Check",service="gateway"}} {5 * n}
""",
        "batcher": f"""# TYPE moemesh_batcher_time_to_first_token_seconds histogram
moemesh_batcher_time_to_first_token_seconds_bucket{{le="0.1"}} {n}
moemesh_batcher_time_to_first_token_seconds_bucket{{le="+Inf"}} {n}
moemesh_batcher_time_to_first_token_seconds_sum {0.05 * n}
moemesh_batcher_time_to_first_token_seconds_count {n}
# TYPE moemesh_batcher_generation_tokens counter
moemesh_batcher_generation_tokens_total {10 * n}
# TYPE moemesh_batcher_num_requests_waiting gauge
moemesh_batcher_num_requests_waiting 3
# TYPE moemesh_batcher_kv_cache_usage_perc gauge
moemesh_batcher_kv_cache_usage_perc 0.25
""",
        "metering": f"""# TYPE moemesh_metering_requests counter
moemesh_metering_requests_total{{finish_reason="length",model="m",tenant="acme"}} {n}
# TYPE moemesh_metering_tokens counter
moemesh_metering_tokens_total{{kind="prompt",model="m",tenant="acme"}} {6 * n}
moemesh_metering_tokens_total{{kind="completion",model="m",tenant="acme"}} {4 * n}
moemesh_metering_tokens_total{{kind="cached",model="m",tenant="acme"}} {n}
# TYPE moemesh_metering_charged_usd counter
moemesh_metering_charged_usd_total{{model="m",tenant="acme"}} {1e-5 * n}
# TYPE moemesh_metering_cost_of_goods_usd counter
moemesh_metering_cost_of_goods_usd_total{{model="m",tenant="acme"}} {2.5e-6 * n}
# TYPE moemesh_metering_feedback counter
moemesh_metering_feedback_total{{completed="yes",tenant="acme"}} 3
moemesh_metering_feedback_total{{completed="no",tenant="acme"}} 1
moemesh_metering_feedback_total{{completed="unanswered",tenant="acme"}} 5
# TYPE moemesh_metering_rating histogram
moemesh_metering_rating_bucket{{le="+Inf",tenant="acme"}} 2
moemesh_metering_rating_sum{{tenant="acme"}} 7
moemesh_metering_rating_count{{tenant="acme"}} 2
""",
        "router": f"""# TYPE moemesh_expert_tokens counter
moemesh_expert_tokens_total{{layer="0",expert="0"}} {3 * n}
moemesh_expert_tokens_total{{layer="0",expert="1"}} {n}
moemesh_expert_tokens_total{{layer="1",expert="0"}} {2 * n}
moemesh_expert_tokens_total{{layer="1",expert="1"}} {2 * n}
# TYPE moemesh_router_expert_step_seconds histogram
moemesh_router_expert_step_seconds_bucket{{le="+Inf",shard="127.0.0.1:7001"}} {n}
moemesh_router_expert_step_seconds_sum{{shard="127.0.0.1:7001"}} {0.02 * n}
moemesh_router_expert_step_seconds_count{{shard="127.0.0.1:7001"}} {n}
""",
    }
    for job, text in texts.items():
        parse_into(snap, job, text)
        snap.up[job] = True
    snap.aliases = {"127.0.0.1:7001": "expert-0"}
    return snap
