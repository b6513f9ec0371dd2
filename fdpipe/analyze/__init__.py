"""Diagnostics of what distillation did to a student: attention distance, head diversity, loss landscape."""
