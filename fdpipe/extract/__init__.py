"""Stage one: run a teacher once over the augmentation plan and fill a store.

``from fdpipe.extract import ExtractConfig, extract`` runs it from Python; both load on first use, so that
``fdpipe --help`` does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExtractConfig", "extract"]


def __getattr__(name: str) -> Any:
    if name == "ExtractConfig":
        from .settings import ExtractConfig

        return ExtractConfig
    if name == "extract":
        from .loop import extract

        return extract
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
