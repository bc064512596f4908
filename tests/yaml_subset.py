"""A strict reader for the YAML our deployment files use; PyYAML is not a dependency.

Understood: block mappings and sequences (also a sequence at its key's indentation,
and ``- key: value`` items), flow sequences of scalars, ``[]`` and ``{}``, plain,
single- and double-quoted scalars, comments, anchors on block or scalar values,
aliases and ``<<`` merge keys. Anything else raises :class:`YamlSubsetError` with
the line number, so a file cannot silently drift outside what is checked here.

Plain scalars resolve as in YAML 1.2's core schema (null, booleans, integers,
decimal floats). Scalars that PyYAML (YAML 1.1) and Compose's Go parser (YAML 1.2)
read differently are refused and must be quoted: ``yes``/``no``/``on``/``off``,
``5555:5555``, ``0755``, ``1e3``, ``1_000``, dates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_NULL = frozenset({"null", "Null", "NULL", "~"})
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+)")
_AMBIGUOUS = re.compile(
    r"(?i:y|n|yes|no|on|off)"  # YAML 1.1 booleans
    r"|[-+]?[0-9][0-9_]*(:[0-9]+)+(\.[0-9]*)?"  # sexagesimal
    r"|[-+]?0[0-9_]+|[-+]?0[xXoObB][0-9a-fA-F_]+"  # octal, hex, binary
    r"|[-+]?[0-9][0-9_]*_[0-9_]*(\.[0-9_]*)?"  # digit separators
    r"|[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+"  # exponents
    r"|[-+]?\.(inf|Inf|INF|nan|NaN|NAN)"
    r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ].*)?"  # timestamps
)
_ANCHOR = re.compile(r"[A-Za-z0-9_.-]+")
_ESCAPES = {"\\": "\\", '"': '"', "/": "/", "n": "\n", "t": "\t", "r": "\r", "0": "\0", " ": " "}
_RESERVED = frozenset("!|>%@`?{")


class YamlSubsetError(ValueError):
    """The text is not YAML, or uses YAML this reader does not support."""


@dataclass(frozen=True)
class _Line:
    number: int
    indent: int
    text: str


def load_yaml(text: str) -> Any:
    """Parse one YAML document written in the supported subset."""
    return _Parser(text).parse()


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _escape_at(text: str, i: int, quote: str) -> bool:
    """A two-character escape at ``i``: ``\\x`` in double quotes, ``''`` in single ones."""
    if quote == '"':
        return text[i] == "\\"
    return text[i : i + 2] == "''"


def _strip_comment(text: str, number: int) -> str:
    quote: str | None = None
    i = 0
    while i < len(text):
        char = text[i]
        if quote is not None and _escape_at(text, i, quote):
            i += 2
            continue
        if quote is not None:
            if char == quote:
                quote = None
        elif char == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
        elif char in "\"'" and (i == 0 or text[i - 1] in " [,"):
            quote = char
        i += 1
    if quote is not None:
        raise YamlSubsetError(f"line {number}: unterminated quoted scalar")
    return text.rstrip()


def _lines(text: str) -> list[_Line]:
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        body = raw.lstrip(" ")
        if body.startswith("\t"):
            raise YamlSubsetError(f"line {number}: tab in indentation")
        content = _strip_comment(body, number)
        if not content:
            continue
        if content in ("---", "...") or content.startswith("%"):
            raise YamlSubsetError(f"line {number}: documents and directives are not supported")
        lines.append(_Line(number, len(raw) - len(body), content))
    return lines


def _quoted_end(text: str) -> int:
    """Index just past the quoted scalar that starts ``text``; -1 if it never ends."""
    quote, i = text[0], 1
    while i < len(text):
        if _escape_at(text, i, quote):
            i += 2
        elif text[i] == quote:
            return i + 1
        else:
            i += 1
    return -1


def _split_key(text: str) -> tuple[str, str] | None:
    """``(key, rest)`` when ``text`` starts a mapping entry, else None."""
    if text[0] in "\"'":
        end = _quoted_end(text)
        if end < 0:
            return None
        after = text[end:].lstrip(" ")
        if after == ":" or after.startswith(": "):
            return _unquote(text[:end]), after[1:].strip()
        return None
    for match in re.finditer(":", text):
        at = match.start()
        if at + 1 == len(text) or text[at + 1] == " ":
            key = text[:at].rstrip()
            if key and key[0] not in _RESERVED | set("[]&*,#\"'") and not _is_item(key):
                return key, text[at + 1 :].strip()
            return None
    return None


def _unquote(text: str) -> str:
    if text[0] == "'":
        return text[1:-1].replace("''", "'")
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        if body[i] == "\\":
            escaped = body[i + 1 : i + 2]
            if escaped not in _ESCAPES:
                raise YamlSubsetError(f"unsupported escape \\{escaped} in {text}")
            out.append(_ESCAPES[escaped])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def _plain(text: str, number: int) -> Any:
    if ": " in text or text.endswith(":"):
        raise YamlSubsetError(f"line {number}: ': ' inside a plain scalar; quote it")
    if text in _NULL:
        return None
    if text in _BOOL:
        return _BOOL[text]
    if _AMBIGUOUS.fullmatch(text):
        raise YamlSubsetError(f"line {number}: {text!r} reads differently in YAML 1.1; quote it")
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


class _Parser:
    def __init__(self, text: str) -> None:
        self.lines = _lines(text)
        self.pos = 0
        self.anchors: dict[str, Any] = {}

    def parse(self) -> Any:
        if not self.lines:
            return None
        if self.lines[0].indent != 0:
            raise YamlSubsetError(f"line {self.lines[0].number}: document is indented")
        value = self._block(0)
        if self.pos < len(self.lines):
            raise YamlSubsetError(f"line {self.lines[self.pos].number}: bad indentation")
        return value

    def _block(self, indent: int) -> Any:
        line = self.lines[self.pos]
        if _is_item(line.text):
            return self._sequence(indent)
        if _split_key(line.text) is None:
            raise YamlSubsetError(f"line {line.number}: expected 'key: value' or '- item'")
        return self._mapping(indent)

    def _mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merges: list[dict[str, Any]] = []
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            if line.indent < indent or (line.indent == indent and _is_item(line.text)):
                break
            entry = _split_key(line.text) if line.indent == indent else None
            if entry is None:
                raise YamlSubsetError(f"line {line.number}: bad indentation or not a key")
            key, rest = entry
            self.pos += 1
            value = self._value(rest, line, indent)
            if key == "<<":
                merges.extend(self._merge_sources(value, line))
            elif key in result:
                raise YamlSubsetError(f"line {line.number}: duplicate key {key!r}")
            else:
                result[key] = value
        for source in merges:  # explicit keys win; earlier merges win over later ones
            for key, value in source.items():
                result.setdefault(key, value)
        return result

    def _merge_sources(self, value: Any, line: _Line) -> list[dict[str, Any]]:
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(source, dict) for source in sources):
            raise YamlSubsetError(f"line {line.number}: '<<' needs a mapping alias")
        return sources

    def _value(self, rest: str, line: _Line, indent: int) -> Any:
        anchor = None
        if rest.startswith("&"):
            anchor, _, rest = rest[1:].partition(" ")
            if not _ANCHOR.fullmatch(anchor):
                raise YamlSubsetError(f"line {line.number}: bad anchor name {anchor!r}")
            rest = rest.strip()
        value = self._nested(indent) if rest == "" else self._inline(rest, line)
        if anchor is not None:
            self.anchors[anchor] = value
        return value

    def _nested(self, indent: int) -> Any:
        if self.pos >= len(self.lines):
            return None
        line = self.lines[self.pos]
        if line.indent > indent:
            return self._block(line.indent)
        if line.indent == indent and _is_item(line.text):
            return self._sequence(indent)
        return None

    def _sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            if line.indent < indent or (line.indent == indent and not _is_item(line.text)):
                break
            if line.indent > indent:
                raise YamlSubsetError(f"line {line.number}: bad indentation")
            rest = line.text[1:]
            item = rest.lstrip(" ")
            if item == "":
                self.pos += 1
                deeper = self.pos < len(self.lines) and self.lines[self.pos].indent > indent
                items.append(self._block(self.lines[self.pos].indent) if deeper else None)
            elif _is_item(item) or _split_key(item) is not None:
                # "- key: value" / "- - x": the rest of the line starts a block at its column
                column = indent + 1 + len(rest) - len(item)
                self.lines[self.pos] = _Line(line.number, column, item)
                items.append(self._block(column))
            else:
                self.pos += 1
                items.append(self._inline(item, line))
        return items

    def _inline(self, text: str, line: _Line) -> Any:
        if text.startswith("*"):
            name = text[1:]
            if name not in self.anchors:
                raise YamlSubsetError(f"line {line.number}: unknown alias {text!r}")
            return self.anchors[name]
        if text == "{}":
            return {}
        if text.startswith("["):
            return self._flow_sequence(text, line)
        if text[0] in "\"'":
            if _quoted_end(text) != len(text):
                raise YamlSubsetError(f"line {line.number}: text after a quoted scalar")
            return _unquote(text)
        if text[0] in _RESERVED | set("&]}"):
            raise YamlSubsetError(f"line {line.number}: unsupported YAML: {text!r}")
        return _plain(text, line.number)

    def _flow_sequence(self, text: str, line: _Line) -> list[Any]:
        """``[a, "b", 'c']``: scalars and aliases only, no nesting, no trailing comma."""
        if not text.endswith("]"):
            raise YamlSubsetError(f"line {line.number}: flow sequence must end the line")
        body = text[1:-1].strip()
        items: list[Any] = []
        while body:
            if body[0] in "\"'":
                end = _quoted_end(body)
                if end < 0:
                    raise YamlSubsetError(f"line {line.number}: unterminated quoted scalar")
            else:
                comma = body.find(",")
                end = len(body) if comma < 0 else comma
            item, body = body[:end].strip(), body[end:].strip()
            if not item or item[0] in "[{":
                raise YamlSubsetError(f"line {line.number}: unsupported flow sequence item")
            items.append(self._inline(item, line))
            if body:
                if not body.startswith(","):
                    raise YamlSubsetError(f"line {line.number}: expected ',' in flow sequence")
                body = body[1:].strip()
                if not body:
                    raise YamlSubsetError(f"line {line.number}: trailing ',' in flow sequence")
        return items
