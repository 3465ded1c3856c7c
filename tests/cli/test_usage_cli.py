"""`moemesh usage` in-process on a ledger filled through the real Meter (injected clock)."""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from moemesh.cli.main import main as cli
from moemesh.cli.usage import parse_time
from services.metering.connection import run_on_redis
from services.metering.feedback import Feedback, FeedbackStore
from services.metering.ledger import Usage
from services.metering.meter import Meter
from services.metering.plot import PROMPT, COST
from services.metering.secret import load_or_create_secret
from services.metering.tenants import TenantStore

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=timezone.utc).timestamp()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    clock = [T0]

    async def fill(client) -> None:
        await TenantStore(client, load_or_create_secret()).create("acme")
        meter = Meter(client, clock=lambda: clock[0])
        for i in range(12):  # one request every 30 min from 10:00: 10:00 .. 15:30
            clock[0] = T0 + i * 1800
            await meter.commit(Usage(f"r{i}", "acme", model="m", prompt_tokens=100, completion_tokens=10 * i,
                                     cached_tokens=20, engine_s=0.5, finish_reason="stop"))
        await FeedbackStore(client).give("acme", Feedback("r1", rating=4, task_completed=True))

    run_on_redis(fill)
    return tmp_path


def _read_png(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_json_totals_over_a_period(capsys) -> None:
    assert cli(["usage", "--tenant", "acme", "--json", "--since", "2026-01-05T11:00", "--until",
                "2026-01-05T13:00"]) == 0
    out = json.loads(capsys.readouterr().out)  # r2 .. r5
    assert (out["requests"], out["prompt_tokens"], out["completion_tokens"], out["cached_tokens"]) == (4, 400, 140, 80)
    # 320 prompt tokens at $0.001/1k, 80 cached ones at a quarter of it, 140 completion tokens at $0.001/1k
    assert out["price_usd"] == pytest.approx(0.00048) and out["cost_usd"] == pytest.approx(4 * 0.5 * 0.0425 / 3600)
    assert out["margin_usd"] == pytest.approx(out["price_usd"] - out["cost_usd"])
    assert cli(["usage", "--tenant", "acme", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 12 and out["satisfaction"] == 4.0 and out["task_completion_rate"] == 1.0


def test_csv_export_and_table(capsys) -> None:
    assert cli(["usage", "--tenant", "acme", "--csv", "--until", str(T0 + 3600)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["request_id"] for r in rows] == ["r0", "r1"] and rows[1]["rating"] == "4"
    assert cli(["usage", "--tenant", "acme"]) == 0
    table = capsys.readouterr().out
    assert "TOTAL" in table and " 12 " in table and "4.00" in table
    assert "cached" in table.splitlines()[1] and " 240 " in table.splitlines()[-1]  # 12 x 20 cached prompt tokens


def test_plot_draws_tokens_and_dollars_per_hour(capsys, tmp_path: Path) -> None:
    png = tmp_path / "usage.png"
    assert cli(["usage", "--tenant", "acme", "--plot", str(png)]) == 0
    assert "6 buckets" in capsys.readouterr().err  # 10:00 .. 15:00
    width, height, raw = _read_png(png)
    assert (width, height) == (1000, 700) and len(raw) == height * (1 + 3 * width)
    assert bytes(PROMPT) in raw and bytes(COST) in raw


def test_unknown_tenant_and_bad_times_exit_1(capsys) -> None:
    assert cli(["usage", "--tenant", "nobody"]) == 1
    assert "'nobody' does not exist" in capsys.readouterr().err
    assert cli(["usage", "--tenant", "acme", "--since", "yesterday"]) == 1
    assert "'yesterday' is not a time" in capsys.readouterr().err


def test_parse_time() -> None:
    assert parse_time("1767225600") == 1767225600.0
    assert parse_time("2026-01-01") == 1767225600.0
    assert parse_time("2026-01-01T02:00+02:00") == 1767225600.0
    assert parse_time("now-2h", now=10_000.0) == 2800.0
    assert parse_time("now", now=5.0) == 5.0
