"""Fine-tuning a distilled student: classifier construction, layer decay, Core-tuning and DeiT-style distillation.

``from fdpipe.finetune import FinetuneConfig, finetune`` runs stage three from Python. They are imported lazily so
that ``fdpipe --help`` does not load the training stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FinetuneConfig", "finetune"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
