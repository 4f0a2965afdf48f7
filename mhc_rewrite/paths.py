"""Module paths (``"model.layers.3.mlp"``): the common part of several, and moving one in and out of a region."""

from __future__ import annotations

from typing import Iterable, Sequence


def common_prefix(sequences: Iterable[Sequence[str]]) -> list[str]:
    """The longest list every sequence starts with (``[]`` for no sequence)."""
    common: list[str] | None = None
    for seq in sequences:
        if common is None:
            common = list(seq)
            continue
        i = 0
        while i < min(len(common), len(seq)) and common[i] == seq[i]:
            i += 1
        del common[i:]
    return common or []


def common_path(paths: Iterable[str]) -> str:
    """The deepest module path holding every one of ``paths`` (``"a.b"`` for ``"a.b.c"`` and ``"a.b.d"``)."""
    return ".".join(common_prefix(path.split(".") for path in paths))


def relative(path: str, region: str) -> str:
    """``path`` (a path in the whole model) as seen from inside the module at ``region``."""
    if not region:
        return path
    return "" if path == region else path[len(region) + 1:]


def absolute(path: str, region: str) -> str:
    """``path`` (a path inside the module at ``region``) as a path in the whole model."""
    if not region:
        return path
    return f"{region}.{path}" if path else region
