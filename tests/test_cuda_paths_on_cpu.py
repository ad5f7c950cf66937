"""The CUDA-only branches that a CPU run never takes, with recording stand-ins for torch.cuda's streams, events and
generators: the side-stream prefetch of torch_gpu, the benchmark's event timing, the CUDA RNG state of checkpoints."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from cmae_ds.data.pipelines import torch_gpu as gpu_pipeline
from cmae_ds.engine.checkpoints import store
from cmae_ds.tasks.benchmark import StepTimer, _peak_mem_gib


class Recorder:
    """torch.cuda's Stream, Event, stream(), current_stream(), set_device() and synchronize() as objects that log
    what is done with them, and on which thread; the current stream is per thread, as CUDA's is."""

    def __init__(self):
        self.log, self.local = [], threading.local()
        recorder = self

        class Stream:
            def __init__(self, name='side'):
                self.name = name

            def wait_event(self, event):
                recorder.log.append(('wait', self.name, event.tag, threading.current_thread().name))

            def synchronize(self):
                recorder.log.append(('stream sync', self.name))

        class Event:
            def __init__(self, **kw):
                self.tag = None

            def record(self, stream=None):
                self.tag = (stream.name if stream is not None else recorder.current, len(recorder.log))
                recorder.log.append(('record', self.tag[0]))

        self.Stream, self.Event = Stream, Event
        self.main = Stream('main')

    @property
    def current(self) -> str:
        return getattr(self.local, 'stream', 'main')

    @contextlib.contextmanager
    def stream(self, s):
        saved, self.local.stream = self.current, s.name
        yield
        self.local.stream = saved

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, 'Stream', lambda device=None: self.Stream())
        monkeypatch.setattr(torch.cuda, 'Event', self.Event)
        monkeypatch.setattr(torch.cuda, 'stream', self.stream)
        monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: self.main)
        monkeypatch.setattr(torch.cuda, 'set_device', lambda device: self.log.append(('set_device', str(device))))
        monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: self.log.append(('device sync',)))


def test_producer_thread_builds_the_next_batch_on_its_stream_before_the_current_is_handed_over(monkeypatch):
    rec = Recorder()
    rec.install(monkeypatch)
    main_thread = threading.current_thread().name

    def make(b):
        rec.log.append(('make', b, rec.current, threading.current_thread().name))
        return {'b': b, 'img': torch.zeros(1)}

    for out in gpu_pipeline.produce_ahead(((b,) for b in range(3)), make, torch.device('cuda')):
        rec.log.append(('use', out['b']))
    log = rec.log
    made = [e for e in log if e[0] == 'make']
    assert [e[:3] for e in made] == [('make', b, 'side') for b in range(3)]  # all on the producer's stream
    assert all(e[3] != main_thread for e in made)  # ... and off the training thread
    assert not [e for e in log if 'sync' in e[0]]  # no host wait anywhere
    for b in range(3):
        use = log.index(('use', b))
        waits = [i for i, e in enumerate(log[:use]) if e[0] == 'wait']
        assert len(waits) == b + 1 and log[waits[-1]][1] == 'main' and log[waits[-1]][3] == main_thread
        assert log[waits[-1]][2][1] > log.index(made[b])  # the main stream waits for an event recorded after b


def test_producer_thread_works_ahead_and_passes_errors_to_the_training_thread():
    """On the CPU too (the same code path): batch b + 1 is being made while b is used, and an exception in the
    producer reaches the caller."""
    started = [threading.Event() for _ in range(3)]

    def make(b):
        started[b].set()
        if b == 2:
            raise ValueError('bad batch 2')
        return b

    got = gpu_pipeline.produce_ahead(((b,) for b in range(3)), make, torch.device('cpu'))
    assert next(got) == 0 and started[1].wait(10)  # 1 was queued before 0 was handed over
    assert next(got) == 1
    with pytest.raises(ValueError, match='bad batch 2'):
        next(got)


def test_benchmark_times_cuda_steps_with_events_and_one_synchronize(monkeypatch):
    clock, syncs = iter([0.0, 10.0, 25.0, 45.0]), []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = next(clock)

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, 'Event', Event)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: syncs.append(1))
    timer = StepTimer(torch.device('cuda'))
    for _ in range(4):
        timer.mark()
    assert syncs == []  # no host wait per step
    assert timer.durations_ms() == [10.0, 15.0, 20.0] and syncs == [1]
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda device=None: 3 * 2**30)
    assert _peak_mem_gib(torch.device('cuda')) == 3.0


def test_checkpoints_carry_and_restore_the_cuda_generators(monkeypatch):
    cuda_states, restored = [torch.tensor([1, 2], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: restored.append(states))
    state = store.rng_state()
    assert state['cuda'] is cuda_states
    torch.rand(3)  # the CPU stream moves on; the restore puts it back
    cpu_before = state['torch'].clone()
    store.set_rng_state(state)
    assert restored == [cuda_states] and torch.equal(torch.get_rng_state(), cpu_before)
