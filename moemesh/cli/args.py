"""Argument types of the CLI that turn bad input into argparse's one-line usage error (exit 2) naming the flag,
instead of a traceback from deeper down (protobuf's "Value out of range", UnicodeEncodeError).

Python decodes a command line that is not UTF-8 with surrogateescape, so such text only fails when it is encoded to
go on the wire; `utf8_text` checks it where the flag is known.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

INT32_MAX = 2**31 - 1
INT64 = (-(2**63), 2**63 - 1)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An int type accepting [low, high] (the range of the protobuf field it ends up in)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range [{low}, {high}]")
        return value

    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def utf8_text(text: str) -> str:
    """Text that can be sent: raises naming the first byte that is not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 ({what} at character {exc.start})") from None
    return text
