"""Small shared test helpers."""
import socket

import torch

from cmae_ds.config import ModelConfig


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def debug_cfg(**kw) -> ModelConfig:
    return ModelConfig(size='debug', img_size=64, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def fixture_config(fx) -> ModelConfig:
    return ModelConfig(**{k: v for k, v in fx['config'].items() if k not in ('batch', 'num_classes')})
