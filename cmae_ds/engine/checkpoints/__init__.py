"""Run checkpoints: completion marker, verification, resume on another layout, model state."""
