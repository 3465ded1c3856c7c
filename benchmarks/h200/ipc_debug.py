"""cuda_ipc with two shard processes on one GPU: per-step relative logits error against the in-process engine for
three settings (both sides graphs, router eager + shards graphs, all eager), to locate a mismatch.

    PYTHONPATH=. python3 benchmarks/h200/ipc_debug.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.services.router.test_cuda_ipc_gpu import CONFIG, _steps, _wait_ready  # noqa: E402
from tests.mesh_process import free_port  # noqa: E402


def main() -> None:
    from moemesh.runtime.engine import Engine
    from moemesh.runtime.spec import load_spec
    from moemesh.serving import cuda_ipc
    from services.router import cuda_ipc_dispatch
    from services.router.expert_client import GrpcShardClient
    from services.router.placement import Placement

    tmp = Path(tempfile.mkdtemp())
    (tmp / "config.json").write_text(json.dumps(CONFIG))
    prompts = torch.randint(0, CONFIG["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(0)).tolist()
    reference = _steps(Engine.load(tmp, load_format="dummy", device="cuda", dtype=torch.bfloat16), prompts)
    real_refusal = cuda_ipc.graphs_refusal
    for name, router_graphs, shard_graphs in (("graphs", True, True), ("router-eager", False, True),
                                              ("eager", False, False)):
        procs, clients = [], []
        try:
            for i in range(2):
                port, log = free_port(), tmp / f"expert-{name}-{i}.log"
                env = {**os.environ, "MOEMESH_MODEL": str(tmp), "MOEMESH_EXPERT_PORT": str(port),
                       "MOEMESH_EXPERT_DEVICE": "cuda", "MOEMESH_EXPERT_DTYPE": "bfloat16",
                       "MOEMESH_EXPERT_LOAD_FORMAT": "dummy", "MOEMESH_EXPERT_NUM_SHARDS": "2",
                       "MOEMESH_EXPERT_SHARD_INDEX": str(i), "OTEL_SDK_DISABLED": "true"}
                procs.append(subprocess.Popen([sys.executable, "-m", "services.expert"], env=env,
                                              stdout=log.open("w"), stderr=subprocess.STDOUT))
                clients.append(GrpcShardClient(f"127.0.0.1:{port}", connect_timeout=120))
                _wait_ready(clients[-1], procs[-1], log)
            cuda_ipc.graphs_refusal = real_refusal if shard_graphs else (lambda _d: "debug: off")
            placement = Placement(tuple(c.placement() for c in clients))
            print(name, "placement", [sorted(s.experts)[:6] for s in placement.shards] if hasattr(placement, "shards")
                  else placement, flush=True)
            dispatch = cuda_ipc_dispatch.start(clients, placement, mode="cuda_ipc", device="cuda",
                                               spec=load_spec(tmp), local=[True, True], call_timeout=60)
            engine = Engine.load(tmp, dispatch=dispatch, load_format="dummy", device="cuda", dtype=torch.bfloat16,
                                 cuda_graphs=router_graphs)
            got = _steps(engine, prompts)
            errs = [round(((a - b).norm() / b.norm()).item(), 4) for a, b in zip(got, reference)]
            print(name, engine.info.cuda_graphs[:20], "errors per step", errs, flush=True)
            dispatch.close()
        except Exception as exc:  # noqa: BLE001 -- a debugging run reports and goes on
            print(name, "failed:", type(exc).__name__, exc, flush=True)
        finally:
            for c in clients:
                c.close()
            for p in procs:
                p.terminate()
                p.wait(10)
            for f in sorted(tmp.glob(f"expert-{name}-*.log")):
                print(f.name, f.read_text()[-1500:])


if __name__ == "__main__":
    main()
