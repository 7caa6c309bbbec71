"""Masking a secret in every form a line of text can carry it.

A client that echoes its password rarely prints it raw: a JSON encoder
escapes its quotes, backslashes and non-ASCII (``pa"ss\\wörd`` becomes
``pa\\"ss\\\\w\\u00f6rd``), a URL percent-encodes it, a shell quotes it, Python's
``repr`` escapes it.  :class:`Masker` matches the secret one character at a
time, each character in any of the forms those encoders (and one encoder
inside another) write it in, and replaces the whole match with :data:`MASK`.
It knows no process and no log: whoever shows a line masks it first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

from sna.contract.events import MASK

#: Characters shell escaping, JSON, Go and Python put a backslash before
#: (``\\"``, ``\\/``, ``\\ ``, ...): ASCII punctuation and the space.
_BACKSLASHED = frozenset(" !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

#: One-letter escapes of JSON, Go, C and Python.
_SHORT_ESCAPES = {
    "\n": "n",
    "\r": "r",
    "\t": "t",
    "\b": "b",
    "\f": "f",
    "\v": "v",
    "\a": "a",
    "\0": "0",
}


def _hex(value: int, width: int) -> str:
    """``value`` as ``width`` hex digits, each digit matching either case."""
    digits = f"{value:0{width}x}"
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in digits)


def _char_forms(char: str) -> str:
    """A regular expression of the ways ``char`` may be written."""
    code = ord(char)
    utf8 = char.encode("utf-8", "surrogatepass")
    # Escapes, behind one or more backslashes: a string escaped once, or escaped
    # again inside another (a JSON message that quotes a JSON body).
    escapes = []
    if code < 0x10000:
        escapes.append("u" + _hex(code, 4))
    else:
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        escapes.append(f"u{_hex(high, 4)}\\\\+u{_hex(low, 4)}")
    escapes.append("U" + _hex(code, 8))
    if code < 0x100:
        escapes.append("x" + _hex(code, 2))
    # A byte string's repr, or a C or shell escape: the UTF-8 bytes one by one.
    escapes.append("\\\\+".join("x" + _hex(b, 2) for b in utf8))
    escapes.append("\\\\+".join(f"{b:03o}" for b in utf8))
    if char in _SHORT_ESCAPES:
        escapes.append(_SHORT_ESCAPES[char])
    forms = [re.escape(char), "\\\\+(?:" + "|".join(escapes) + ")"]
    if char in _BACKSLASHED:
        forms.append("\\\\+" + re.escape(char))
    # Percent-encoding (once or twice), and ``+`` for a space as a form encodes it.
    forms.append("".join("%(?:25)*" + _hex(b, 2) for b in utf8))
    if char == " ":
        forms.append(r"\+")
    if char == "'":
        # Inside single quotes a shell cannot escape one: it closes, adds one, reopens.
        forms.extend([re.escape("'\"'\"'"), re.escape("'\\''")])
    return "(?:" + "|".join(forms) + ")"


def secret_pattern(secret: str) -> str:
    """A regular expression matching ``secret`` written in any of the forms."""
    return "".join(_char_forms(c) for c in secret)


class Masker:
    """Replaces every secret it was given, in any form, by :data:`MASK`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # The longest first: where two match at one place, the whole of the longer goes.
        found = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._pattern: Optional[re.Pattern[str]] = None
        if found:
            self._pattern = re.compile("|".join(secret_pattern(s) for s in found))

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)


def mask(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every form of each of ``secrets`` replaced by :data:`MASK`."""
    return Masker(secrets)(text)
