"""Shard patterns (`shard-{000000..000099}.tar`, `a.tar::b.tar`), counted before they are expanded.

webdataset's `expand_urls` (bash-style braces, `::` lists, `${VAR}` from WDS_VAR) builds every name it stands for:
`x{0..9999999999}.tar` is 10^10 names that never finish, and a store's recorded `data.spec` can hold such a pattern
as well as a command line can. So the pattern is first counted with braceexpand's own grammar (a range is its
length, `{a,b}` the sum of its parts, juxtaposed parts the product), in time linear in the pattern's length, and
refused above MAX_SHARD_NAMES; only then is it expanded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from fdpipe.errors import FdpipeError

MAX_SHARD_NAMES = 100_000  # the shards of one image source (LAION-400M comes in 41,000)
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")  # as braceexpand's
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _range_length(lo: int, hi: int, step: str | None) -> int:
    return abs(hi - lo) // ((int(step) or 1) if step else 1) + 1


def _unescaped(text: str) -> Iterator[tuple[int, str, int]]:
    """(position, character, brace depth after it) of each character of `text` that no backslash escapes."""
    depth, pos = 0, 0
    while pos < len(text):
        ch = text[pos]
        if ch == "\\":
            pos += 2
            continue
        depth += (ch == "{") - (ch == "}")
        yield pos, ch, depth
        pos += 1


def _count_pattern(pattern: str, cap: int) -> int:
    """How many names `pattern` expands to (at most cap + 1: the count stops growing once past the cap)."""
    total, start, depth = 1, 0, 0
    for pos, ch, depth in _unescaped(pattern):
        if ch == "{" and depth == 1:
            start = pos
        elif ch == "}" and depth == 0:
            total = min(cap + 1, total * _count_expression(pattern[start + 1:pos], cap))
    if depth != 0:
        raise FdpipeError(f"shard pattern {pattern!r} has unbalanced braces; close each '{{' with a '}}'")
    return total


def _count_expression(expr: str, cap: int) -> int:
    """A brace's content: a range, a comma sequence, or (neither) a literal brace around a pattern."""
    found = _INT_RANGE.match(expr)
    if found:
        return _range_length(int(found.group(1)), int(found.group(2)), found.group(3))
    found = _CHAR_RANGE.match(expr)
    if found:
        return _range_length(_ALPHABET.index(found.group(1)), _ALPHABET.index(found.group(2)), found.group(3))
    items, start, depth = [], 0, 0
    for pos, ch, depth in _unescaped(expr):
        if ch == "," and depth == 0:
            items.append(expr[start:pos])
            start = pos + 1
    if depth != 0 or not items:
        return _count_pattern(expr, cap)
    items.append(expr[start:])
    return min(cap + 1, sum(_count_pattern(item, cap) for item in items))


def count_names(spec: str, cap: int = MAX_SHARD_NAMES) -> int:
    """How many names a `::`-separated list of brace patterns stands for, up to cap + 1."""
    from webdataset.shardlists import envsubst  # here: webdataset imports torch

    total = 0
    for part in spec.split("::"):
        for _ in range(10):  # as expand_urls: ${VAR} substituted until nothing changes (ten rounds at most)
            part, last = envsubst(part), part
            if part == last:
                break
        try:
            total += _count_pattern(part, cap)
        except RecursionError:
            raise FdpipeError(f"shard pattern {spec[:80]!r}...: braces nested too deeply to expand") from None
        if total > cap:
            break
    return total


def expand_shards(spec: str) -> list[str]:
    """The names a shard pattern stands for, refused in one line when they are more than MAX_SHARD_NAMES."""
    from webdataset.shardlists import expand_urls

    if count_names(spec) > MAX_SHARD_NAMES:
        shown = spec if len(spec) <= 200 else spec[:200] + "..."
        raise FdpipeError(f"image source {shown}: the pattern stands for more than {MAX_SHARD_NAMES:,} shards, more "
                          "than fdpipe opens; narrow its ranges or pack the images into fewer shards")
    return expand_urls(spec)
