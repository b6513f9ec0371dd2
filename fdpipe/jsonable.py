"""JSON's shapes for what fdpipe records (manifests, config.json, settings): one rule, stdlib only, so that the store
contract and the models layer both use it without importing each other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def json_able(x: Any) -> Any:
    """Mappings become dicts with str keys, tuples lists; numbers, strings, bools and None stay; anything else its
    str()."""
    if isinstance(x, Mapping):
        return {str(k): json_able(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_able(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
