"""Go's ``encoding/json`` as the SHA's handlers use it: decoding request bodies, encoding answers.

Pure: bytes in, Python values or a :class:`GoJSONError` out.  The SHA
decodes each body with ``json.NewDecoder(r.Body).Decode(&v)`` into a typed
struct (sha-contract.md §2.2, §2.3), which is stricter than ``json.loads``:

- a JSON number goes into an ``int``/``int64`` field only if it is written
  as an integer (``strconv.ParseInt``): ``1.0`` and ``1e3`` are errors, as is
  anything outside int64;
- a ``float64`` field takes any number, except one that overflows (``1e400``);
- a string goes only into a string field, a bool into no field here;
- ``null`` leaves a field as it is (for a pointer or a slice: nil);
- object keys match field names exactly first, then case-insensitively
  (Go's ``foldName``: each rune upper(lower(r))), unknown keys are ignored,
  a repeated key assigns again;
- the decoder reads one JSON value and ignores what follows it.

A type error does not stop decoding (Go saves the first one and returns it at
the end); any error makes the SHA answer 400, so only the first is kept.
Error texts follow Go's where they matter (the ``details`` of /complete's
400); syntax-error texts are approximate.

Encoding follows ``json.Encoder``: maps with sorted keys, structs in field
order, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped, no ASCII escaping of
other characters, a trailing newline.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
_WHITESPACE = " \t\n\r"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class GoJSONError(ValueError):
    """What Go's decoder returns; its text is the error's ``Error()``."""


# -- the parse tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """A JSON number as written: Go decides what it may become by its text."""

    text: str


class Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs, in order, repeats kept."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value")


_DECODER = json.JSONDecoder(
    object_pairs_hook=Pairs,
    parse_float=Number,
    parse_int=Number,
    parse_constant=_reject_constant,
    strict=True,
)


def _go_string(text: str) -> str:
    """Go replaces an invalid ``\\u`` surrogate (and invalid UTF-8) with U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, Pairs):
        return Pairs((_go_string(k), _clean(v)) for k, v in value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def parse(body: bytes) -> Any:
    """The first JSON value of ``body`` as a tree of Pairs, lists, str, bool, None and Number."""
    text = body.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    if start == len(text):
        raise GoJSONError("EOF")
    try:
        value, _end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as e:
        if e.pos >= len(text):
            raise GoJSONError("unexpected EOF") from None
        raise GoJSONError(f"invalid character {text[e.pos]!r} ({e.msg})") from None
    except ValueError as e:
        raise GoJSONError(str(e)) from None
    return _clean(value)


# -- Go types ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scalar:
    """``string``, ``int``, ``int64`` or ``float64``."""

    go: str


STRING = Scalar("string")
INT = Scalar("int")
INT64 = Scalar("int64")
FLOAT64 = Scalar("float64")


@dataclass(frozen=True)
class Struct:
    """A Go struct: its type name (as Go prints it; "" if anonymous) and its JSON fields."""

    name: str
    fields: tuple[tuple[str, GoType], ...]


@dataclass(frozen=True)
class Pointer:
    """``*T`` for a struct T: nil (None) or a decoded struct."""

    to: Struct


@dataclass(frozen=True)
class Slice:
    """``[]T`` for a struct T: nil (None) or a list of decoded structs."""

    of: Struct


GoType = Union[Scalar, Struct, Pointer, Slice]


def zero(kind: GoType) -> Any:
    if isinstance(kind, Scalar):
        return {"string": "", "float64": 0.0}.get(kind.go, 0)
    if isinstance(kind, Struct):
        return {name: zero(field) for name, field in kind.fields}
    return None


def fold_name(name: str) -> str:
    """Go's ``foldName``: ASCII upper-cased, other runes upper(lower(r)) with one-rune mappings."""
    out = []
    for c in name:
        if c < "\x80":
            out.append(c.upper())
            continue
        lower = c.lower()
        c = lower if len(lower) == 1 else c
        upper = c.upper()
        out.append(upper if len(upper) == 1 else c)
    return "".join(out)


def _describe(value: Any) -> str:
    """The ``Value`` of Go's UnmarshalTypeError."""
    if isinstance(value, Number):
        return f"number {value.text}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, Pairs):
        return "object"
    return "array"


class _Decoder:
    def __init__(self) -> None:
        self.first_error: GoJSONError | None = None

    def fail(self, value: Any, where: str, go_type: str) -> None:
        if self.first_error is None:
            target = f"Go struct field {where}" if where else "Go value"
            self.first_error = GoJSONError(
                f"json: cannot unmarshal {_describe(value)} into {target} of type {go_type}"
            )

    def value(self, value: Any, kind: GoType, current: Any, where: str) -> Any:
        """The field's new value after assigning ``value`` to it (``current`` if Go leaves it)."""
        if value is None:
            return None if isinstance(kind, (Pointer, Slice)) else current
        if isinstance(kind, Scalar):
            return self.scalar(value, kind, current, where)
        if isinstance(kind, Struct):
            if not isinstance(value, Pairs):
                self.fail(value, where, kind.name or "struct {...}")
                return current
            return self.struct(value, kind, current, where)
        if isinstance(kind, Pointer):
            if not isinstance(value, Pairs):
                self.fail(value, where, f"*{kind.to.name}")
                return current
            base = current if isinstance(current, dict) else zero(kind.to)
            return self.struct(value, kind.to, base, where)
        if not isinstance(value, list) or isinstance(value, Pairs):
            self.fail(value, where, f"[]{kind.of.name}")
            return current
        return [
            self.value(item, kind.of, zero(kind.of), where) if item is not None else zero(kind.of)
            for item in value
        ]

    def scalar(self, value: Any, kind: Scalar, current: Any, where: str) -> Any:
        if kind.go == "string":
            if isinstance(value, str):
                return value
        elif isinstance(value, Number):
            if kind.go == "float64":
                number = float(value.text)
                if not math.isinf(number):
                    return number
            elif re.fullmatch(r"-?[0-9]+", value.text):
                integer = int(value.text)
                if INT64_MIN <= integer <= INT64_MAX:
                    return integer
        self.fail(value, where, kind.go)
        return current

    def struct(
        self, pairs: Pairs, kind: Struct, current: dict[str, Any], where: str
    ) -> dict[str, Any]:
        result = dict(current)
        exact = {name: field for name, field in kind.fields}
        folded = {fold_name(name): name for name, _ in kind.fields}
        for key, item in pairs:
            name = key if key in exact else folded.get(fold_name(key))
            if name is None:
                continue
            path = f"{where}.{name}" if where else f"{kind.name}.{name}"
            result[name] = self.value(item, exact[name], result[name], path)
        return result


def decode(body: bytes, kind: Struct) -> dict[str, Any]:
    """``json.NewDecoder(body).Decode(&v)`` for a struct ``v`` of ``kind``: its fields, or an error."""
    tree = parse(body)
    decoder = _Decoder()
    if tree is None:
        return zero(kind)  # type: ignore[no-any-return]
    if not isinstance(tree, Pairs):
        decoder.fail(tree, "", kind.name or "struct {...}")
        assert decoder.first_error is not None
        raise decoder.first_error
    result = decoder.struct(tree, kind, zero(kind), "")
    if decoder.first_error is not None:
        raise decoder.first_error
    return result


# -- encoding ---------------------------------------------------------------------------------


class GoStruct(dict[str, Any]):
    """A value Go encodes as a struct: keys in insertion (field) order, not sorted."""


_HTML_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _string(text: str) -> str:
    encoded = json.dumps(_go_string(text), ensure_ascii=False)
    return "".join(_HTML_ESCAPES.get(c, c) for c in encoded)


def _number(value: float) -> str:
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


def _parts(value: Any) -> Iterator[str]:
    if value is None:
        yield "null"
    elif isinstance(value, bool):
        yield "true" if value else "false"
    elif isinstance(value, int):
        yield str(value)
    elif isinstance(value, float):
        yield _number(value)
    elif isinstance(value, str):
        yield _string(value)
    elif isinstance(value, Mapping):
        items = list(value.items()) if isinstance(value, GoStruct) else sorted(value.items())
        yield "{"
        for n, (key, item) in enumerate(items):
            if n:
                yield ","
            yield _string(key)
            yield ":"
            yield from _parts(item)
        yield "}"
    elif isinstance(value, (list, tuple)):
        yield "["
        for n, item in enumerate(value):
            if n:
                yield ","
            yield from _parts(item)
        yield "]"
    else:
        raise TypeError(f"cannot encode {type(value).__name__}")


def marshal(value: Any) -> bytes:
    """``json.Marshal(value)``: dicts as Go maps (sorted keys), GoStruct in field order."""
    return "".join(_parts(value)).encode()


def encode(value: Any) -> bytes:
    """What ``json.NewEncoder(w).Encode(value)`` writes: ``marshal`` and a newline."""
    return marshal(value) + b"\n"
