import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('CMAE_SHARED', ROOT.parent / 'shared'))
FIXTURE_A = SHARED / 'fixtures' / 'official_cmae_parity_a.pt'


@pytest.fixture(scope='session')
def fixture_a():
    if not FIXTURE_A.exists():
        pytest.fail(f'official parity fixture missing: {FIXTURE_A} (set CMAE_SHARED to the shared/ folder)')
    return torch.load(FIXTURE_A, weights_only=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
