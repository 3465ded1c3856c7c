"""A tool call streamed while it is generated: tool_choice "required" makes the model write one JSON object
{"name": ..., "arguments": {...}} (grammar-constrained, structured.py); CallStream scans that text as it grows and
sends OpenAI's fragments: the first (id, name, arguments so far) once the name string has closed, then each new
piece of the arguments' raw text. Concatenated, the fragments' arguments are exactly the raw text of the
"arguments" value, which is also what the non-streamed answer returns (tool_calls.parse uses `arguments_text`).

The scan is a small JSON tokenizer over the top-level object only (strings with escapes, nesting depth, keys at
depth 1); it never re-reads text it has seen. Arguments stream while the scan is inside their object or array; a
scalar arguments value (not what a tool schema asks for, but legal JSON) is sent whole when it ends.

tool_choice "auto" is not streamed this way: its text is free, and whether a <tool_call> block is a call is known
only at the block's end (an invalid block stays content), so auto keeps answering whole at the end (choices.py).
"""

from __future__ import annotations

import json

from gateway.tool_calls import call_id


class CallStream:
    def __init__(self) -> None:
        self.text = ""
        self.id: str | None = None  # set with the first fragment
        self.name: str | None = None
        self._pos = 0  # text[:_pos] is scanned
        self._depth = 0
        self._in_str, self._escaped, self._str_start = False, False, 0
        self._key: str | None = None  # the depth-1 key whose value is being read
        self._want_key = True  # at depth 1: the next string is a key (else a value)
        self._args = [None, None]  # [start, end) of the arguments value in text
        self._sent = 0  # characters of the arguments already sent

    def feed(self, text: str) -> list[tuple[str | None, str | None, str]]:
        """New text -> fragments (id or None, name or None, arguments piece); the first fragment carries id and
        name, the later ones only argument pieces."""
        self.text += text
        self._scan()
        return self._fragments()

    def arguments(self) -> str | None:
        """The raw arguments text once its value has ended, else None."""
        start, end = self._args
        return None if start is None or end is None else self.text[start:end]

    def _fragments(self) -> list[tuple[str | None, str | None, str]]:
        if self.name is None or self._args[0] is None:
            return []
        start, end = self._args
        upto = end if end is not None else (self._pos if self._depth >= 2 else start)  # scalars: whole at the end
        piece = self.text[start + self._sent:upto]
        self._sent += len(piece)
        if self.id is None:
            self.id = call_id()
            return [(self.id, self.name, piece)]
        return [(None, None, piece)] if piece else []

    def _scan(self) -> None:
        for i in range(self._pos, len(self.text)):
            self._char(i, self.text[i])
        self._pos = len(self.text)

    def _char(self, i: int, c: str) -> None:
        if self._in_str:
            if self._escaped:
                self._escaped = False
            elif c == "\\":
                self._escaped = True
            elif c == '"':
                self._in_str = False
                self._string_ended(self.text[self._str_start:i + 1])
            return
        if c == '"':
            self._in_str, self._str_start = True, i
            self._value_starts(i)
        elif c in "{[":
            self._value_starts(i)
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            self._value_ends(i + 1 if self._depth >= 1 else i, closing=self._depth == 1)
        elif c == ":" and self._depth == 1:
            self._want_key = False
        elif c == "," and self._depth == 1:
            self._value_ends(i, closing=False)
            self._want_key, self._key = True, None
        elif not c.isspace():
            self._value_starts(i)

    def _value_starts(self, i: int) -> None:
        if self._depth == 1 and not self._want_key and self._key == "arguments" and self._args[0] is None:
            self._args[0] = i

    def _value_ends(self, end: int, closing: bool) -> None:
        """A depth-1 value may end here: an object/array closing back to depth 1, or a scalar at , or }."""
        start = self._args[0]
        if self._key == "arguments" and start is not None and self._args[1] is None:
            if closing or self.text[start] not in "{[":
                self._args[1] = len(self.text[:end].rstrip()) if not closing else end

    def _string_ended(self, literal: str) -> None:
        if self._depth != 1:
            return
        if self._want_key:
            self._key = _loads(literal)
        elif self._key == "name" and self.name is None:
            self.name = _loads(literal)
        if self._key == "arguments" and not self._want_key and self._args[0] is not None:
            self._value_ends(self._str_start + len(literal), closing=False)


def arguments_text(text: str) -> str | None:
    """The raw text of a {"name": ..., "arguments": ...} object's arguments value (None when it has none)."""
    stream = CallStream()
    stream.feed(text)
    return stream.arguments()


def _loads(literal: str) -> str | None:
    try:
        value = json.loads(literal)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
