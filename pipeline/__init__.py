"""Offline knowledge distillation: stage 1 dumps teacher logits to a zarr label bank, stage 2 trains from it."""

__version__ = "0.1.0"
