"""Shared fixtures and the test lanes.

Lanes (markers, registered in pytest.ini): `slow` (multi-process or longer than ~10 s), `dist` (several ranks),
`gpu` (needs CUDA). The everyday lane is `python -m pytest -q -m "not slow" tests`.
"""

import os
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET when it is first imported, and importing torchvision's decoders or torch._dynamo
# imports it: set it before any test module is collected, so the kernel tests run interpreted whatever the order.
os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SHARED = Path(os.environ.get('CMAE_SHARED', ROOT.parent / 'shared'))
FIXTURE_A = SHARED / 'fixtures' / 'official_cmae_parity_a.pt'

# The helper modules (helpers.py, engine_helpers.py, ...) sit beside the tests and are imported by name.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


# Module fixtures that start a run (or build something as costly) shared by several tests of their module. Under
# pytest-xdist (pytest.ini) each worker makes its own copy of a module fixture its tests need: the tests using one
# of these are put in one xdist_group, so `--dist loadgroup` sends them to one worker and the run is made once.
# A module fixture that only writes a few images needs no entry: its tests spread over the workers.
SHARED_RUNS = {
    'test_elastic': 'chain',
    'test_preemption': 'straight',
    'test_run_wiring': 'straight',
    'test_data_shards': 'packed',
    'test_data_views': 'views',
    'test_compile_lane': 'pretrained',
    'test_shards_at_scale': 'packed',
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks into node ids
def pytest_collection_modifyitems(config, items):
    grouping = getattr(config.option, 'loadgroup', False)  # set in xdist's workers under --dist loadgroup
    for item in items:
        module = getattr(getattr(item, 'module', None), '__name__', '').rpartition('.')[2]
        if SHARED_RUNS.get(module) not in getattr(item, 'fixturenames', ()):
            continue
        group = f'{module}.{SHARED_RUNS[module]}'
        item.add_marker(pytest.mark.xdist_group(group))
        if grouping and hasattr(item, '_id'):
            _suffix_group(item, group)


def _suffix_group(item, group: str) -> None:
    """The node id `...@group` that xdist's scheduler groups by. xdist 3.8 writes it into `item._nodeid`, which
    pytest 9.2 no longer reads (node ids are structured, `item._id`): the groups were silently ignored and each
    worker made the shared run again (https://github.com/pytest-dev/pytest-xdist/issues/1386, fix proposed in
    pull 1388). Written here the way that fix does; a suffix xdist adds again later is harmless (it splits at the
    last @)."""
    from _pytest.nodeid import NodeId

    item._id = NodeId.parse(f'{item.nodeid}@{group}')


@pytest.fixture(scope='session')
def fixture_a():
    """The official code's outputs. A fresh clone has no shared/ beside it: the parity tests skip there, saying
    where the fixture comes from; under CI (CI=true), where shared/ is always laid beside the checkout, a missing
    fixture fails."""
    if not FIXTURE_A.exists():
        message = (
            f'official parity fixture not found at {FIXTURE_A}: it is made by the official CMAE code '
            '(shared/fixtures/README.md); place the shared/ folder beside the checkout or set CMAE_SHARED'
        )
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(message)
        pytest.skip(message)
    return torch.load(FIXTURE_A, weights_only=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _kernel_switches():
    """Tests that switch fusion off or force an attention backend leave the process as they found it."""
    from cmae_ds.kernels import _switch

    saved = _switch.settings()
    yield
    _switch._set(saved)  # and the ops forget the choices made under the test's switches


TORCH_FUNCTIONS = {name: getattr(torch.nn.functional, name) for name in ('linear', 'embedding')}


def _process_state() -> dict:
    """What one test can change for the tests after it on the same xdist worker, whichever they are. (Not the
    intra-op threads: a run sizes them for its process, engine/dist.py, and the suite's timings assume it.)"""
    return {
        'default dtype': torch.get_default_dtype(),
        'grad mode': torch.is_grad_enabled(),
        'deterministic': torch.are_deterministic_algorithms_enabled(),
        **{f'functional.{n}': getattr(torch.nn.functional, n) for n in TORCH_FUNCTIONS},
    }


@pytest.fixture(autouse=True)
def _torch_state_untouched():
    """No test leaves torch's process state changed. ZeRO-3's engine swaps `functional.linear` for its own for good
    (engine/torch_globals.py); a run in this process left it so, and a later test on the same xdist worker that
    scripted an nn.Linear failed inside TorchScript, depending on which worker drew which tests. This fails the test
    that leaks, and puts torch back for the rest."""
    before = _process_state()
    yield
    after = _process_state()
    for name, fn in TORCH_FUNCTIONS.items():
        setattr(torch.nn.functional, name, fn)
    torch.set_default_dtype(before['default dtype'])
    torch.set_grad_enabled(before['grad mode'])
    torch.use_deterministic_algorithms(before['deterministic'])
    changed = {k: (before[k], after[k]) for k in before if after[k] != before[k]}
    assert not changed, f'the test left torch changed (before, after): {changed}'


@pytest.fixture(autouse=True)
def _process_group_env():
    """A test that builds an engine in this process (setup_distributed writes RANK, MASTER_PORT, ... for its one-rank
    group) leaves the environment and the group as it found them: launch scripts started by later tests inherit the
    environment, took that group's port for theirs and died with EADDRINUSE on the port this process still held."""
    from cmae_ds.engine import dist

    from run_recorder import GROUP_ENV, restore_group_env

    saved = {k: os.environ.get(k) for k in GROUP_ENV}
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    yield
    if not had_group and torch.distributed.is_available() and torch.distributed.is_initialized():
        dist.shutdown_distributed()
    restore_group_env(saved)


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder that `make(folder)` fills once per session, whichever xdist worker asks first; the others wait for
    it (a file lock in the session's temporary folder, which the workers share) and reuse it. A failed make is
    reported to every test that asks, without making it again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # pytest-of-<user>/pytest-<n>/: the workers' folders are popen-gw0, popen-gw1, ...
    from filelock import FileLock

    folder, failed = root / name, root / f'{name}.failed'
    with FileLock(str(root / f'{name}.lock')):
        if failed.exists():
            pytest.fail(f'{name} failed in another worker: {failed.read_text()}')
        if not (folder / '.made').exists():
            folder.mkdir(exist_ok=True)
            try:
                make(folder)
            except BaseException as e:
                failed.write_text(f'{type(e).__name__}: {e}'[-3000:])
                raise
            (folder / '.made').touch()
    return folder


def _pretrain(folder: Path) -> None:
    from engine_helpers import TINY, run_python, tail, write_ds

    ds = write_ds(folder, zero_optimization={'stage': 1})
    run = folder / 'run'
    args = ['launch/pretrain.py', '--deepspeed_config', ds, *TINY, 'train.max_steps=2', 'train.save_every_steps=2']
    proc = run_python([*args, f'train.output_dir={run}'])
    assert proc.returncode == 0, tail(proc)


@pytest.fixture(scope='session')
def pretrained_run(tmp_path_factory):
    """One tiny pretraining run, made once per session: the debug model of engine_helpers.TINY, 2 steps on ZeRO-1
    (model and optimizer states in separate files), its checkpoint at step 2, model.safetensors and README.md.
    The tests that start from a pretrained run or its checkpoint (fine-tuning, probing, evaluation, safe loading)
    share it: read it, or copy it before changing anything in it."""
    folder = made_once(tmp_path_factory, 'pretrained_run', _pretrain)
    run = folder / 'run'
    return dict(ds=str(folder / 'ds.json'), run=run, tag=run / 'checkpoints' / 'step_00000002')
