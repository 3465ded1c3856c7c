"""`moemesh bench`: load-test a running mesh (like `vllm bench serve`), or run the same load on the in-process
engine for the mesh/in-process ratio.

  moemesh bench --concurrency 8 --requests 64 --max-tokens 64 --ignore-eos        # the running `moemesh up`
  moemesh bench --endpoint https://127.0.0.1:8443 --ca ~/.moemesh/certs/ca.pem     # the edge, OpenAI HTTP
  moemesh bench --in-process --model smollm2-moe --concurrency 8 --requests 64     # Engine in this process

--endpoint: host:port (or grpc://host:port) is a gateway over gRPC; http(s)://... an OpenAI-compatible HTTP server
(the moemesh edge). Unset endpoint, API key, model and CA come from the running `moemesh up`'s status file.
Arrivals: a closed loop at --concurrency, or --rate Poisson arrivals per second with at most --concurrency in
flight. One warm-up request runs first and is not counted. Exit status 1 when no request completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from moemesh.bench import report
from moemesh.bench.progress import Progress
from moemesh.bench.stats import RequestRecord, summarize
from moemesh.bench.workload import LoadSpec

DEFAULT_ENDPOINT = "127.0.0.1:50051"
DEFAULT_REQUESTS = 16


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="load-test the mesh (or the in-process engine)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", help="gateway host:port, or http(s):// URL of an OpenAI-compatible server "
                                      "(default: the running mesh's gateway)")
    p.add_argument("--api-key", help="API key (default: env MOEMESH_API_KEY, else the status file's dev key)")
    p.add_argument("--model", help="model id (client: default the served one); with --in-process: name or path")
    p.add_argument("--ca", type=Path, help="CA certificate for https endpoints (default: the mesh's dev CA), or of "
                   "the gateway's mTLS (gRPC endpoints)")
    p.add_argument("--cert", type=Path, help="client certificate for a gateway speaking mTLS (with --key; default "
                   "with MOEMESH_MTLS=1: the mesh's dev certificate)")
    p.add_argument("--key", type=Path, help="private key of --cert")
    p.add_argument("--concurrency", type=int, default=1, help="most requests in flight (default 1)")
    p.add_argument("--requests", type=int, help=f"requests to send (default {DEFAULT_REQUESTS} unless --duration)")
    p.add_argument("--duration", type=float, help="seconds to keep sending requests")
    p.add_argument("--rate", type=float, help="Poisson arrivals per second (default: closed loop)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="synthetic prompt of about N tokens (default 128)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per request (default 64)")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens, past end-of-sequence")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--output", type=Path, help="also write the JSON result to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--status-file", type=Path,
                   help="status file of `moemesh up` (default MOEMESH_HOME/run/status.json)")
    p.add_argument("--in-process", action="store_true", help="run the load on the Engine in this process")
    p.add_argument("--device", default="cpu", help="--in-process: torch device (default cpu)")
    p.add_argument("--dtype", default="float32", help="--in-process: compute dtype (default float32)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="--in-process: what the KV cache stores (fp8: e4m3)")
    p.set_defaults(func=run)


def load_spec(ns: argparse.Namespace) -> LoadSpec:
    requests = ns.requests if ns.requests is not None or ns.duration is not None else DEFAULT_REQUESTS
    return LoadSpec(concurrency=ns.concurrency, requests=requests, duration_s=ns.duration, rate=ns.rate,
                    prompt_tokens=ns.prompt_tokens, max_tokens=ns.max_tokens, ignore_eos=ns.ignore_eos,
                    temperature=ns.temperature, seed=ns.seed)


def run(ns: argparse.Namespace) -> int:
    try:
        spec = load_spec(ns)
    except ValueError as exc:
        print(f"moemesh bench: {exc}", file=sys.stderr)
        return 2
    argv = _argv(ns)
    try:
        if ns.in_process:
            doc = _in_process(ns, spec, argv)
        else:
            doc = asyncio.run(_client(ns, spec, argv))
    except (ValueError, FileNotFoundError, WarmupError) as exc:
        print(f"moemesh bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if ns.json else report.table(doc), flush=True)
    if ns.output:
        ns.output.parent.mkdir(parents=True, exist_ok=True)
        ns.output.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if doc["completed"] else 1


def _argv(ns: argparse.Namespace) -> list[str]:
    """This command's arguments, for the JSON's `command`: as typed when run as `moemesh bench`, else (called from
    Python) rebuilt from the flags that are set."""
    if sys.argv[1:2] == ["bench"]:
        return sys.argv[2:]
    flags = {k: v for k, v in vars(ns).items() if k not in ("func", "command") and v not in (None, False)}
    return [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]


class WarmupError(RuntimeError):
    """The first (uncounted) request failed: nothing to measure."""


def _progress(ns: argparse.Namespace, spec: LoadSpec) -> Progress:
    return Progress(spec.requests, spec.duration_s, enabled=not ns.no_progress)


async def _client(ns: argparse.Namespace, spec: LoadSpec, argv: list[str]) -> dict:
    from moemesh.bench.load import LoadRun

    backend, target, mode = _backend(ns)
    try:
        warm = RequestRecord(start=0.0)
        warm_spec = LoadSpec(requests=1, prompt_tokens=8, max_tokens=2, temperature=spec.temperature)
        try:
            await backend.send("Hello", warm_spec, warm, lambda: 0.0)
        except Exception as exc:
            raise WarmupError(f"warm-up request to {target} failed: {exc} (is the mesh running? `moemesh up`, or "
                              f"pass --endpoint / --api-key)") from None
        progress = _progress(ns, spec)
        records, duration = await LoadRun(backend, spec, on_done=progress.update).run()
        progress.close()
    finally:
        await backend.close()
    return report.document(summarize(records, duration), spec, mode=mode, target=target, model=backend.model,
                           argv=argv)


def _backend(ns: argparse.Namespace):
    """(backend, target, mode) from the flags, then the environment, then the running mesh's status file (whose dev
    key and model are used only for that mesh's own gateway or edge: never sent to another server)."""
    from moemesh.serving import status as status_file

    status = status_file.read(ns.status_file) or {}
    if ns.endpoint and ns.endpoint.rstrip("/") not in (status.get("gateway"), status.get("edge_https")):
        status = {}
    endpoint = ns.endpoint or status.get("gateway") or DEFAULT_ENDPOINT
    key = ns.api_key or os.environ.get("MOEMESH_API_KEY") or status.get("api_key")
    if endpoint.startswith(("http://", "https://")):
        from moemesh.bench.backends import OpenAIBackend

        ca = ns.ca or os.environ.get("MOEMESH_CA_CERT") or status.get("ca_cert")
        if ca and not Path(ca).is_file():
            raise FileNotFoundError(f"--ca: {str(ca)!r} is not a file")
        ca = Path(ca) if ca and endpoint.startswith("https://") else None
        return OpenAIBackend(endpoint, key, ns.model or status.get("model"), ns.timeout, ca), endpoint, "openai-http"
    from moemesh.bench.backends import GrpcBackend
    from moemesh.certs.client_tls import ClientTls

    target = endpoint.removeprefix("grpc://")
    tls = ClientTls(ns.ca, ns.cert, ns.key)  # mTLS when given, or with MOEMESH_MTLS=1
    return GrpcBackend(target, key, ns.model or status.get("model"), ns.timeout, tls), target, "grpc"


def _in_process(ns: argparse.Namespace, spec: LoadSpec, argv: list[str]) -> dict:
    from moemesh.bench.in_process import InProcessRun, load_engine  # torch: only here

    from moemesh.serving import status as status_file

    model = ns.model or (status_file.read(ns.status_file) or {}).get("model")
    if not model:
        raise ValueError("--model: required with --in-process (no running `moemesh up` to take it from)")
    engine, prompt_ids = load_engine(model, spec, device=ns.device, dtype=ns.dtype, kv_cache_dtype=ns.kv_cache_dtype)
    InProcessRun(engine, prompt_ids, LoadSpec(requests=1, prompt_tokens=8, max_tokens=2)).run()  # warm-up
    progress = _progress(ns, spec)
    records, duration = InProcessRun(engine, prompt_ids, spec, on_done=progress.update).run()
    progress.close()
    return report.document(summarize(records, duration), spec, mode="in-process", target=f"Engine({ns.device})",
                           model=model, argv=argv, device=f"{ns.device} {ns.dtype}, KV {engine.kv_cache_dtype}")
