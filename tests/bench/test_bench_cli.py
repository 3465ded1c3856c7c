"""`moemesh bench` as users run it (a subprocess): --in-process on the tiny MoE prints the JSON document, bad flags
name themselves, an unreachable endpoint fails fast with a hint, and client mode never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mesh_process import free_port

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"output_tokens_per_s", "ttft_ms", "itl_ms", "e2e_ms", "completed", "failed", "machine", "command"}


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh.cli.main", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_in_process_json_has_the_figures_machine_and_command(tiny_moe_dir, tmp_path):
    out = bench("--in-process", "--model", str(tiny_moe_dir), "--concurrency", "2", "--requests", "4",
                "--prompt-tokens", "8", "--max-tokens", "3", "--ignore-eos", "--json", "--output",
                str(tmp_path / "r.json"), "--kv-cache-dtype", "fp8")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert KEYS <= set(doc) and doc == json.loads((tmp_path / "r.json").read_text())
    assert (doc["completed"], doc["failed"], doc["output_tokens"], doc["mode"]) == (4, 0, 12, "in-process")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert set(doc[name]) == {"mean", "p50", "p95", "p99"} and doc[name]["p50"] > 0
    assert doc["ttft_ms"]["p50"] < doc["e2e_ms"]["p50"] and doc["prompt_tokens_mean"] > 8  # chat template added
    assert doc["command"].startswith("moemesh bench --in-process") and doc["machine"]["cpus"] >= 1
    assert "4/4 requests" in out.stderr  # the progress bar
    assert "KV fp8" in json.dumps(doc)  # an e4m3 KV cache, as asked


def test_bad_flags_name_themselves():
    out = bench("--concurrency", "0")
    assert out.returncode == 2 and "--concurrency: 0 must be an integer >= 1" in out.stderr
    out = bench("--rate", "-3", "--requests", "5")
    assert out.returncode == 2 and "--rate: -3.0" in out.stderr


def test_unreachable_gateway_fails_fast_with_a_hint(tmp_path):
    out = bench("--endpoint", f"127.0.0.1:{free_port()}", "--model", "m", "--status-file", str(tmp_path / "none"),
                timeout=60)
    assert out.returncode == 1 and "warm-up request" in out.stderr and "UNAVAILABLE" in out.stderr
    assert "moemesh up" in out.stderr


def test_client_mode_does_not_import_torch():
    code = ("import sys, argparse; import moemesh.cli.bench as b; "
            "b.register(argparse.ArgumentParser().add_subparsers()); "
            "import moemesh.bench.backends, moemesh.bench.load, moemesh.bench.in_process; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
