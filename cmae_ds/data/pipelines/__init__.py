"""Loaders: which indices a rank reads (sampling), the DALI, PyTorch-worker and torch_gpu pipelines, synthetic
batches, thread sizing, and the two builders the engines call."""
