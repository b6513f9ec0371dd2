"""Fine-tuning a distilled student: classifier construction, layer decay, Core-tuning and DeiT-style distillation."""
