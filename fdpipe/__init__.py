"""fdpipe: feature distillation with a cached, shareable teacher-feature store."""

__version__ = "0.1.0"
