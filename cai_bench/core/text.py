"""Strings that came from a record or a file (a host name, a CPU model, a price file's date) are data: before
they are shown they are cut to a length a table, a title or a line can hold, and their control characters are
written out as escapes, so that none of them moves the cursor, clears the screen, sets a window title or turns
what follows around on the terminal."""

from __future__ import annotations

import re

SHOWN_MAX = 200  # characters of one field shown: a host, a CPU, a package version; cut beyond, saying how much

# C0 and C1 control characters but newline and tab, DEL, and the bidirectional embeddings, overrides and isolates
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with every control character written as its escape (``\\x1b``), the rest as it is."""
    return _CONTROL.sub(_escape, text)


def clip(text: str, limit: int = SHOWN_MAX) -> str:
    """``text`` cut to about ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def shown(value: object, limit: int = SHOWN_MAX) -> str:
    """A field from a record or file as one may show it: its text, cut, its control characters escaped."""
    return visible(clip(str(value), limit))
