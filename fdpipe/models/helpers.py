"""Two helpers every fdpipe.models module shares: the one-line gist of an exception, and JSON-able dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def first_line(e: BaseException) -> str:
    """The gist of an exception on one line (load_state_dict puts its detail on the second line)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    s = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return s if len(s) <= 300 else s[:297] + "..."


def json_able(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): json_able(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_able(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
