"""Renaming checkpoint keys between two layouts with a table of key prefixes: the part every family's key
map shares (models/wan/transformer_keys.py, models/flux/transformer_keys.py).

A row (a, b) renames a key that starts with prefix `a` to the same key starting with `b`; "{n}" in a prefix
stands for a block index and is carried over. A row whose target does not end in "." names a whole key (a
bare parameter such as "modulation"), so it never matches a longer name. The maps are pure functions on
names, tested on key lists, so loading stays a rename plus one strict load.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence, TypeVar

V = TypeVar("V")

ORIGINAL_PREFIX = "model.diffusion_model."
"""Prefix some repackaged original checkpoints put in front of every key (ComfyUI-style files)."""


def strip_prefix(key: str) -> str:
    """`key` without the `model.diffusion_model.` prefix of repackaged original files."""
    return key[len(ORIGINAL_PREFIX):] if key.startswith(ORIGINAL_PREFIX) else key


def compile_prefix(prefix: str) -> re.Pattern[str]:
    """A pattern matching keys that start with `prefix` ("{n}" = a block index), the rest as group "rest"."""
    return re.compile("^" + re.escape(prefix).replace(re.escape("{n}"), r"(?P<n>\d+)") + "(?P<rest>.*)$")


class PrefixTable:
    """Rows (a, b) read in one direction: `rename` maps a key starting with row[src] to row[1 - src]."""

    def __init__(self, rows: Sequence[tuple[str, str]], src: int) -> None:
        self._table = tuple((compile_prefix(row[src]), row[1 - src]) for row in rows)

    def rename(self, key: str) -> str | None:
        """The renamed key, or None when no row matches."""
        for pattern, target in self._table:
            m = pattern.match(key)
            if m:
                if "{n}" in target:
                    target = target.replace("{n}", m.group("n"))
                if not target.endswith(".") and m.group("rest"):
                    continue  # a whole-key row must not match a longer name
                return target + m.group("rest")
        return None


def put_once(out: dict[str, V], key: str, value: V, source: str) -> None:
    """out[key] = value, refusing a second checkpoint key that maps to the same name."""
    if key in out:
        raise ValueError(f"two checkpoint keys map to {key!r} (the second is {source!r}); the file mixes layouts")
    out[key] = value


def strip_original_prefix(sd: Mapping[str, V]) -> dict[str, V]:
    """Original keys with the `model.diffusion_model.` prefix removed (other keys unchanged)."""
    out: dict[str, V] = {}
    for key, value in sd.items():
        put_once(out, strip_prefix(key), value, key)
    return out
