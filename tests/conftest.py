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
