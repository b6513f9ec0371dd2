"""Image keys: what names an image in a store (a wds member prefix, an index string) and how a source's names
become one.

Stdlib only, below both the image sources (fdpipe.data, which makes keys) and the store (fdpipe.store, which
checks every key it reads), so that neither imports the other for it.
"""

from __future__ import annotations

import re

_WDS_META = re.compile(r"__.*__")  # a part WebDataset skips as metadata (its skip_meta pattern)
# What key_problem refuses, as one pattern (RE2 and Python's re read it alike) that finds a bad key among a column
# of them at once: empty; a dot, a backslash or a control character; a leading, trailing or doubled '/'; a __part__.
UNSAFE_KEY = r"^$|[\\.\x00-\x1f]|^/|/$|//|(^|/)__[^/]*__(/|$)"


def sanitize_key(key: str) -> str:
    """A key WebDataset can round-trip and a tar can hold as a member name: '/' separators, no dots (WebDataset
    splits a key at its first dot, and so no '..' either) and no empty parts (so no leading '/': the member name
    stays relative)."""
    return "/".join(part for part in key.replace("\\", "/").replace(".", "_").split("/") if part)


def key_problem(key: object) -> str | None:
    """Why `key` cannot identify an image in a store (as a wds member prefix and an index string), or None."""
    if not isinstance(key, str) or not key:
        return "is empty"
    if key != sanitize_key(key):
        return "is not a relative '/'-separated name without dots"
    if any(ord(ch) < 32 for ch in key):
        return "holds a control character"
    if any(_WDS_META.fullmatch(part) for part in key.split("/")):
        return "has a __part__ that WebDataset skips as metadata"
    return None
