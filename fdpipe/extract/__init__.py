"""Stage one: run a teacher once over the augmentation plan and fill a store."""

from .loop import ExtractConfig, extract

__all__ = ["ExtractConfig", "extract"]
