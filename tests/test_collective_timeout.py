"""collective_timeout_s (docs/reliability.md, 'Hung peers'): a collective whose peer never joins fails after the
configured time instead of hanging. Two plain processes on gloo through cmae_ds.engine.dist.setup_distributed, the
function every task's start_run calls with section.collective_timeout_s."""

import re
import subprocess
import sys

import pytest

from engine_helpers import ROOT, env
from helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.dist]

TIMEOUT_S, PEER_AWAY_S = 3, 40


def test_a_collective_whose_peer_never_joins_fails_after_the_timeout():
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        e = env()
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
        cmd = [sys.executable, 'tests/dist_scripts/late_peer.py', str(TIMEOUT_S), str(PEER_AWAY_S)]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    try:
        out = procs[0].communicate(timeout=300)[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    found = re.search(r'failed after ([\d.]+) s: (.*)', out)
    assert found, out[-3000:]
    # well before the peer goes away (which would fail the collective anyway, by a closed connection)
    assert TIMEOUT_S - 0.5 <= float(found.group(1)) < PEER_AWAY_S / 2, out[-3000:]
    assert 'timed out' in found.group(2).lower() or 'timeout' in found.group(2).lower(), found.group(0)
