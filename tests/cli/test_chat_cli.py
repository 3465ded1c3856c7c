"""`moemesh chat` without a mesh: what a new user meets before any answer (issue 16). The client path must not load
torch; bad input is a one-line usage error naming the flag (exit 2), never a traceback. The answers themselves, the
finish-reason notice and long prompts from stdin/--file run against the real mesh in tests/edge/test_edge_first_hour.py.
Start-up time is measured by benchmarks/cli_startup.py, not here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "transformers", "safetensors", "redis", "matplotlib")
# Runs the CLI in a fresh interpreter, then says which heavy modules it loaded.
PROBE = ("import sys\nfrom moemesh.cli.main import main\ntry:\n    code = main(sys.argv[1:])\n"
         "except SystemExit as exc:\n    code = exc.code\n"
         f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), 'CODE=' + str(code))")


def _probe(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MOEMESH_HOME": str(ROOT / ".no-such-home")})
    return out.stdout.strip().splitlines()[-1]


def _cli(*argv: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh.cli.main", *argv], cwd=ROOT, input=stdin,
                          capture_output=True, timeout=60)


CLIENT_COMMANDS = ("chat", "usage", "tenants", "trace", "bench", "top")


@pytest.mark.parametrize("argv", [("--help",), *[(c, "--help") for c in CLIENT_COMMANDS],
                                  ("chat", "--endpoint", "127.0.0.1:9", "--timeout", "2", "Hi")])
def test_client_commands_do_not_import_heavy_modules(argv: tuple[str, ...]) -> None:
    heavy, code = _probe(*argv).split()
    assert heavy == "HEAVY=", (argv, heavy)
    assert code == ("CODE=0" if "--help" in argv else "CODE=1")  # 1: nothing listens on port 9


def _one_line_usage_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(f in err for f in fragments), (fragments, err)
    return err


@pytest.mark.parametrize(("flag", "value"), [("--max-tokens", "99999999999"), ("--max-tokens", "0"),
                                             ("--seed", str(2**64)), ("--temperature", "nan"),
                                             ("--max-tokens", "many")])
def test_out_of_range_numbers_are_one_line_errors_naming_the_flag(flag: str, value: str) -> None:
    _one_line_usage_error(_cli("chat", flag, value, "Hi"), f"argument {flag}:", value)


def test_text_that_is_not_utf8_is_a_one_line_error_naming_the_argument() -> None:
    _one_line_usage_error(_cli("chat", b"caf\xe9"), "argument text:", "not valid UTF-8", "0xe9")
    _one_line_usage_error(_cli("chat", "--system", b"\xff", "Hi"), "argument --system:", "0xff")


def test_message_sources_are_checked_before_anything_is_sent(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Grüße".encode("latin-1"))
    _one_line_usage_error(_cli("chat"), "TEXT", "--file")
    _one_line_usage_error(_cli("chat", "Hi", "--file", str(latin1)), "exactly one")
    _one_line_usage_error(_cli("chat", "--file", str(latin1)), "--file", "not valid UTF-8")
    _one_line_usage_error(_cli("chat", "--file", str(tmp_path / "missing.txt")), "--file", "No such file")
    _one_line_usage_error(_cli("chat", "-", stdin=b"  \n"), "standard input", "empty")
    _one_line_usage_error(_cli("chat", "-", stdin=b"\xff"), "standard input", "not valid UTF-8")


def test_an_unreachable_mesh_is_one_line_with_what_to_do() -> None:
    out = _cli("chat", "--endpoint", "127.0.0.1:9", "--timeout", "2", "Hi")
    err = out.stderr.decode()
    assert out.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "UNAVAILABLE" in err and "moemesh up" in err


def test_an_unknown_command_is_one_line() -> None:
    _one_line_usage_error(_cli("chatt", "Hi"), "invalid choice", "chat")
