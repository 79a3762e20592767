"""Distillation methods, one module each, all on the shared training loop (``training/loop.py``)."""
