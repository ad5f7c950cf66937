"""The CUDA-only branches that a CPU run never takes, with recording stand-ins for torch.cuda's streams, events and
generators: the side-stream prefetch of torch_gpu, the benchmark's event timing, the CUDA RNG state of checkpoints."""

from __future__ import annotations

import contextlib

import torch

from cmae_ds.data.pipelines import torch_gpu as gpu_pipeline
from cmae_ds.engine.checkpoints import store
from cmae_ds.tasks.benchmark import StepTimer, _peak_mem_gib


class Recorder:
    """torch.cuda's Stream, Event, stream() and current_stream() as objects that log what is done with them."""

    def __init__(self):
        self.log, self.current = [], 'main'
        recorder = self

        class Stream:
            def __init__(self, name='side'):
                self.name = name

            def wait_event(self, event):
                recorder.log.append(('wait', self.name, event.tag))

        class Event:
            def __init__(self, **kw):
                self.tag, self.t = None, None

            def record(self, stream=None):
                self.tag = (stream.name if stream is not None else recorder.current, len(recorder.log))
                recorder.log.append(('record', self.tag[0]))

        self.Stream, self.Event = Stream, Event
        self.main = Stream('main')

    @contextlib.contextmanager
    def stream(self, s):
        saved, self.current = self.current, s.name
        yield
        self.current = saved

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, 'Stream', lambda device=None: self.Stream())
        monkeypatch.setattr(torch.cuda, 'Event', self.Event)
        monkeypatch.setattr(torch.cuda, 'stream', self.stream)
        monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: self.main)


def test_side_stream_builds_the_next_batch_before_handing_over_the_current(monkeypatch):
    rec = Recorder()
    rec.install(monkeypatch)

    def batches():
        for b in range(3):
            rec.log.append(('make', b, rec.current))
            yield {'b': b, 'img': torch.zeros(1)}

    for out in gpu_pipeline.one_ahead_on_side_stream(batches(), torch.device('cuda')):
        rec.log.append(('use', out['b']))
    log = rec.log
    assert [e for e in log if e[0] == 'make'] == [('make', b, 'side') for b in range(3)]  # all on the side stream
    for b in range(3):
        use = log.index(('use', b))
        if b < 2:
            assert log.index(('make', b + 1, 'side')) < use  # b + 1 is queued before b is handed over
        waits = [i for i, e in enumerate(log[:use]) if e[0] == 'wait']
        assert len(waits) == b + 1 and log[waits[-1]][1] == 'main'  # the main stream waits for b's event first
        made = log.index(('make', b, 'side'))
        assert log[waits[-1]][2][1] > made  # ... an event recorded after batch b was queued


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
