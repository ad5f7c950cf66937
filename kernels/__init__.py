"""Fused kernels (installed as cmae_ds.kernels): each op has a plain PyTorch reference beside its fused version."""
