"""The Makefile's .PHONY lists exactly the targets that exist (a name there without a rule is a typo or a leftover;
a rule missing from it would be skipped whenever a file of that name appears)."""

from __future__ import annotations

import re
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def phony_and_targets(text: str) -> tuple[set[str], set[str]]:
    """(names after .PHONY, names of the rules defined) of a Makefile's text; file targets ($(BIN)/x) are skipped."""
    phony: set[str] = set()
    for line in re.findall(r"^\.PHONY:(.*)$", text, flags=re.M):
        phony.update(line.split())
    targets = set(re.findall(r"^([A-Za-z0-9_-]+)\s*:(?!=)", text, flags=re.M))
    return phony, targets


def test_phony_lists_exactly_the_rules():
    phony, targets = phony_and_targets(MAKEFILE.read_text())
    assert phony, "no .PHONY line"
    assert phony - targets == set(), f".PHONY names targets that do not exist: {sorted(phony - targets)}"
    assert targets - phony == set(), f"rules missing from .PHONY: {sorted(targets - phony)}"


def test_the_check_sees_a_stale_name_and_a_variable_is_no_rule():
    phony, targets = phony_and_targets(".PHONY: test lint\nPY := python3\nMON ?= x\ntest:\n\techo\n")
    assert phony - targets == {"lint"} and targets == {"test"}
