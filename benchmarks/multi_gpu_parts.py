"""Parts of benchmarks/multi_gpu.py: a `moemesh up` mesh as a subprocess, concurrent `moemesh bench` runs, per-layer
expert call times from Prometheus, and a shard SIGKILLed under load."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mesh:
    """`moemesh up` in its own MOEMESH_HOME (logs, status file, metering's Redis and dev key are per home)."""

    def __init__(self, name: str, model: str, up_args: list[str], gpus: str | None, logs: Path) -> None:
        self.name, self.model, self.up_args, self.gpus = name, model, up_args, gpus
        self.home = logs / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.status_path, self.output = self.home / "status.json", self.home / "up.out"
        self.proc: subprocess.Popen | None = None
        self.status: dict = {}

    def start(self, timeout_s: float) -> None:
        env = {**os.environ, "MOEMESH_HOME": str(self.home), "OTEL_SDK_DISABLED": "true"}
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        with self.output.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moemesh.cli.main", "up", "--model", self.model, "--gateway-port",
                 str(free_port()), "--status-file", str(self.status_path), "--dashboard-port", "-1", *self.up_args],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self.status_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mesh {self.name} did not start:\n{self.output.read_text()[-3000:]}")
            time.sleep(0.5)
        self.status = json.loads(self.status_path.read_text())
        print(f"mesh {self.name} SERVING: {self.status['gateway']}", flush=True)

    def scrape(self) -> dict[str, str]:
        """Prometheus text of the routers and expert shards."""
        status = json.loads(self.status_path.read_text())  # a restarted shard has a new metrics port
        out = {}
        for name, service in status["services"].items():
            if name.split("-")[0] in ("router", "expert") and service.get("metrics_port"):
                try:
                    url = f"http://127.0.0.1:{service['metrics_port']}/metrics"
                    out[name] = urllib.request.urlopen(url, timeout=10).read().decode()
                except OSError:
                    out[name] = ""
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bench(jobs: list[tuple[Mesh, int, int]], prompt: int, max_tokens: int, prefix: Path) -> list[dict]:
    """`moemesh bench` against each (mesh, concurrency, requests) at the same time; their JSON documents."""
    procs = []
    for i, (mesh, concurrency, requests) in enumerate(jobs):
        out = prefix.with_name(f"{prefix.name}-{i}.json")
        cmd = [sys.executable, "-m", "moemesh.cli.main", "bench", "--endpoint", mesh.status["gateway"], "--api-key",
               mesh.status["api_key"] or "", "--model", mesh.status["model"], "--concurrency", str(concurrency),
               "--requests", str(requests), "--prompt-tokens", str(prompt), "--max-tokens", str(max_tokens),
               "--ignore-eos", "--json", "--no-progress", "--output", str(out)]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out))
    docs = []
    for proc, out in procs:
        _, err = proc.communicate(timeout=3600)
        if not out.exists():
            raise RuntimeError(f"moemesh bench failed ({proc.returncode}): {err.decode()[-2000:]}")
        docs.append(json.loads(out.read_text()))
    return docs


def _sum(texts: dict[str, str], kind: str, metric: str) -> float:
    pattern = re.compile(rf"^{metric}(\{{[^}}]*\}})? ([0-9.eE+-]+)$")
    return sum(float(m.group(2)) for name, text in texts.items() if name.split("-")[0] == kind
               for m in map(pattern.match, text.splitlines()) if m)


def layer_times(before: list[dict[str, str]], after: list[dict[str, str]]) -> dict:
    """Per expert call (one layer, one shard) over the run: the router's wait, the shard's compute, the rest =
    dispatch + combine. {} without expert calls (experts co-located in the router)."""
    def delta(kind: str, metric: str) -> float:
        return sum(_sum(a, kind, metric) - _sum(b, kind, metric) for b, a in zip(before, after))

    calls = delta("router", "moemesh_router_expert_call_seconds_count")
    computes = delta("expert", "moemesh_expert_forward_compute_seconds_count")
    if calls <= 0 or computes <= 0:
        return {}
    call_us = delta("router", "moemesh_router_expert_call_seconds_sum") / calls * 1e6
    compute_us = delta("expert", "moemesh_expert_forward_compute_seconds_sum") / computes * 1e6
    merged = delta("expert", "moemesh_expert_merged_blocks_total")  # M:N: blocks batched with another router's
    return {"expert_calls": int(calls), "call_us": round(call_us, 1), "compute_us": round(compute_us, 1),
            "dispatch_combine_us": round(call_us - compute_us, 1), "merged_share": round(merged / computes, 3)}


def kill_under_load(mesh: Mesh, service: str, clients: int, max_tokens: int, hang_s: float,
                    limit_s: float = 240.0) -> dict:
    """SIGKILL of `service` while `clients` chat in a loop: time to the first client error, time until a request
    that started after that error succeeds, and requests that ran past hang_s (hung)."""
    from moemesh.sdk import ChatClient

    records: list[tuple[float, float, str | None]] = []  # (start, end, error)
    stop, lock = threading.Event(), threading.Lock()

    def client() -> None:
        chat = ChatClient(mesh.status["gateway"], mesh.status["api_key"], model=mesh.status["model"], timeout=hang_s)
        while not stop.is_set():
            start, error = time.monotonic(), None
            try:
                chat.complete("Count to ten.", max_tokens=max_tokens, ignore_eos=True)
            except Exception as exc:  # noqa: BLE001 -- what the client sees is the measurement
                error = f"{type(exc).__name__}: {str(exc)[:160]}"
                time.sleep(0.2)  # no busy loop while the mesh refuses
            with lock:
                records.append((start, time.monotonic(), error))
        chat.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(5.0)  # load running
    killed = time.monotonic()
    os.kill(mesh.status["services"][service]["pid"], signal.SIGKILL)
    first_error = again = None
    while time.monotonic() - killed < limit_s and again is None:
        time.sleep(0.25)
        with lock:
            errors = [end for start, end, e in records if e and end >= killed]
            first_error = min(errors) if errors else None
            since = first_error if first_error is not None else killed
            ok = [end for start, end, e in records if e is None and start >= since]
            again = min(ok) if ok else None
    stop.set()
    for t in threads:
        t.join(hang_s + 5)
    with lock:
        after = [r for r in records if r[1] >= killed]
    return {"service": service, "clients": clients,
            "time_to_error_s": None if first_error is None else round(first_error - killed, 2),
            "time_to_serve_again_s": None if again is None else round(again - killed, 2),
            "errors": sum(1 for r in after if r[2]), "ok_after_kill": sum(1 for r in after if not r[2]),
            "hung": sum(1 for r in after if r[1] - r[0] >= hang_s * 0.95) + sum(t.is_alive() for t in threads),
            "error_sample": next((r[2] for r in after if r[2]), None)}


def model_dir(device: str, layers: int, logs: Path) -> str:
    """cpu: the built-in smollm2-moe's checkpoint; cuda: the Qwen3-30B-A3B shape with dummy weights and SmolLM2's
    tokenizer (vocab cut to its 49152 ids so that every generated id detokenizes; eos/bos its ids), from
    MOEMESH_TOKENIZER_DIR where set (a machine without the built-in model: benchmarks/h200/wheels.sh carries it)."""
    from moemesh.models.registry import resolve_model

    if device == "cpu":
        return str(resolve_model("smollm2-moe", progress=False))
    from engine_gpu import QWEN3_30B_A3B

    out = logs / "qwen3-30b-a3b-shape"
    out.mkdir(parents=True, exist_ok=True)
    config = {**QWEN3_30B_A3B, "num_hidden_layers": layers, "vocab_size": 49152, "bos_token_id": 1,
              "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config))
    carried = os.environ.get("MOEMESH_TOKENIZER_DIR")
    tokenizer = Path(carried) if carried else resolve_model("smollm2", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    return str(out)
