"""What every fdpipe.models module shares: the one-line gist of an exception (JSON shapes: fdpipe.jsonable)."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The gist of an exception on one line (load_state_dict puts its detail on the second line)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    s = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return s if len(s) <= 300 else s[:297] + "..."
