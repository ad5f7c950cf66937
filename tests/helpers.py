"""Small shared test helpers."""

import contextlib
import itertools
import os
import random
import socket
import sys
import types

import torch

from cmae_ds.config import ModelConfig


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def model_state(path) -> dict:
    """The weights of a model file the project wrote (safetensors, or the older .pt)."""
    from cmae_ds.modelfiles.formats import read_file

    return read_file(path)['state_dict']


def debug_cfg(**kw) -> ModelConfig:
    return ModelConfig(size='debug', img_size=64, **kw)


# Ports for the launchers' rendezvous (--master_port, MASTER_PORT): below Linux's ephemeral range (32768-60999,
# /proc/sys/net/ipv4/ip_local_port_range), which the kernel hands to every bind(0) and outgoing connection, so gloo's
# connections in a test running beside this one (pytest-xdist) cannot take a port between its pick and the
# launcher's bind; one block per xdist worker, walked from a random start, so that the workers of this session never
# pick the same port and another session on the machine is unlikely to.
PORT_BASE, PORT_BLOCK = 20000, 1000
_port_walk = itertools.count(random.randrange(PORT_BLOCK))


def _worker_index() -> int:
    worker = os.environ.get('PYTEST_XDIST_WORKER', 'gw0')  # gw0, gw1, ... under xdist
    return int(worker[2:]) if worker[2:].isdigit() else 0


def free_port() -> int:
    base = PORT_BASE + (_worker_index() % 12) * PORT_BLOCK
    for _ in range(PORT_BLOCK):
        port = base + next(_port_walk) % PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:  # in use, or still in TIME_WAIT from an earlier run
                continue
            return port
    raise RuntimeError(f'no free port in {base}-{base + PORT_BLOCK - 1}')


def fixture_config(fx) -> ModelConfig:
    return ModelConfig(**{k: v for k, v in fx['config'].items() if k not in ('batch', 'num_classes')})


def _metadata_class(qualified: str):
    module, name = qualified.rsplit('.', 1)
    return type(name, (), {'__module__': module, '__init__': lambda self, **kw: self.__dict__.update(kw)})


# Classes official (mmengine-based) checkpoints name in their metadata; mmengine itself is not installed.
MessageHub = _metadata_class('mmengine.logging.message_hub.MessageHub')
HistoryBuffer = _metadata_class('mmengine.logging.history_buffer.HistoryBuffer')


@contextlib.contextmanager
def importable(*classes):
    """While inside, each class's module resolves to a stand-in module holding it, so that pickles name the class
    as its package would; afterwards the modules are gone again, as on a machine without that package."""
    added = []
    for cls in classes:
        parts = cls.__module__.split('.')
        for i in range(1, len(parts) + 1):
            name = '.'.join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        setattr(sys.modules[cls.__module__], cls.__name__, cls)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def save_official_like(path, state_dict: dict, **extra_meta) -> None:
    """An official pretraining .pth as mmengine writes it: weights plus metadata objects and numpy scalars."""
    import numpy as np

    meta = {
        'epoch': np.int64(300),
        'lr': np.float64(1e-3),
        'mmengine_version': '0.7.3',
        'message_hub': {
            'log_scalars': {
                'train/loss': HistoryBuffer(log_history=np.array([1.0, 0.5]), count_history=np.array([1, 2]))
            },
            'runtime_info': MessageHub(epoch=300),
        },
        **extra_meta,
    }
    with importable(MessageHub, HistoryBuffer):
        torch.save({'meta': meta, 'state_dict': state_dict}, path)
