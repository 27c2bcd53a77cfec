"""A small TOML writer: comments, [tables], keys with strings, numbers, booleans and arrays of those.

Not tomli-w: the llama-swap importer's output interleaves comments (its header, each model's notes) with the
tables, which tomli-w cannot write; `dumps` writes a plain nested mapping (the configs scripts/bench.py and
scripts/chaos.py generate) with the same rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any


class TomlWriter:
    """Just enough TOML for a models.toml, line by line."""

    WIDTH = 100

    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, text: str) -> None:
        for line in text.split("\n"):
            self.lines.append(f"# {line}".rstrip())

    def table(self, path: tuple[str, ...]) -> None:
        self.lines += ["", "[" + ".".join(toml_key(p) for p in path) + "]"]

    def entry(self, key: str, value: Any) -> None:
        head = f"{toml_key(key)} = "
        if isinstance(value, list):
            items = [toml_value(v) for v in value]
            inline = head + "[" + ", ".join(items) + "]"
            if len(inline) <= self.WIDTH:
                self.lines.append(inline)
                return
            self.lines.append(head + "[")
            row = ""
            for item in items:
                if row and len(row) + len(item) + 6 > self.WIDTH:
                    self.lines.append(row.rstrip())
                    row = ""
                row += ("    " if not row else "") + item + ", "
            if row:
                self.lines.append(row.rstrip())
            self.lines.append("]")
            return
        self.lines.append(head + toml_value(value))

    def text(self) -> str:
        return "\n".join(self.lines).strip("\n") + "\n"


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value}")
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    raise TypeError(f"cannot write {type(value).__name__} as TOML here")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def dumps(config: Mapping[str, Any]) -> str:
    """A nested mapping as TOML: scalars and arrays as keys, mappings as [tables] (an empty one is still written,
    so `[groups.main]` with nothing in it exists)."""
    writer = TomlWriter()

    def table(path: tuple[str, ...], values: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        if path and (scalars or not values):
            writer.table(path)
        for key, value in scalars.items():
            writer.entry(key, value)
        for key, value in values.items():
            if isinstance(value, Mapping):
                table((*path, key), value)

    table((), config)
    return writer.text()
