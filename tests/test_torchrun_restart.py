"""torchrun --max-restarts over two nodes (issue 31, item 4), shown on one machine: two agents on the loopback
addresses 127.0.0.1 and 127.0.0.2 as two nodes, c10d rendezvous, one worker each (tests/dist_scripts/restart_probe.py).

The worker of one node dies; its agent restarts it and raises its TORCHELASTIC_RESTART_COUNT. The other node's
worker is busy outside any collective: its agent restarts it because a node waits in the next round, which is not
counted (torch/distributed/elastic/agent/server/api.py, `_invoke_run`: "membership changes do not count as
retries"). The two new workers carry restart counts 1 and 0, so ranks that meet under a prefix made of the count
(what cmae_ds/engine/dist.py did) wait for each other until the collective timeout. Without the shared rendezvous
store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, torch/distributed/elastic/rendezvous/dynamic_rendezvous.py) each round
meets on a fresh store on a fresh port, and the restart resumes; with the shared store the run refuses at its
first start in one line saying so."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmae_ds.config import ConfigError
from cmae_ds.engine import dist

from engine_helpers import ROOT, env
from helpers import free_port

TORCHRUN = str(Path(sys.executable).parent / 'torchrun')
PROBE = 'tests/dist_scripts/restart_probe.py'


def agent(tmp_path, addr: str, port: int, victim: bool, extra_env: dict) -> subprocess.Popen:
    cmd = [TORCHRUN, '--nnodes', '2', '--nproc-per-node', '1', '--rdzv-backend', 'c10d']
    cmd += ['--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', 'restart-probe', '--local-addr', addr]
    cmd += ['--rdzv-conf', f'is_host={int(not victim)}', '--max-restarts', '1', '--monitor-interval', '0.2']
    cmd += [PROBE, str(tmp_path)]
    e = {**env(), 'GLOO_SOCKET_IFNAME': 'lo', 'PROBE_VICTIM': str(int(victim)), **extra_env}
    log = open(tmp_path / f'agent_{addr}.log', 'w')
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.dist
def test_two_node_restart_after_a_killed_rank_resumes(tmp_path):
    port = free_port()
    both = {'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
    agents = [agent(tmp_path, '127.0.0.1', port, False, both), agent(tmp_path, '127.0.0.2', port, True, both)]
    deadline = time.monotonic() + 240
    try:
        codes = [a.wait(timeout=max(1, deadline - time.monotonic())) for a in agents]
    finally:
        for a in agents:
            a.kill() if a.poll() is None else None
    logs = [(tmp_path / f'agent_127.0.0.{i}.log').read_text(errors='replace') for i in (1, 2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert (tmp_path / 'killed').exists()
    done = sorted(line.split('probe: ')[1] for log in logs for line in log.splitlines() if 'probe: restart' in line)
    # the two nodes' counts differ, and still the two ranks met: one group of 2 after the restart
    assert done == ['restart count 0, rank 0 of 2, sum 2', 'restart count 1, rank 1 of 2, sum 2'] or done == [
        'restart count 0, rank 1 of 2, sum 2',
        'restart count 1, rank 0 of 2, sum 2',
    ], logs


def test_the_shared_store_over_several_nodes_with_restarts_is_refused_in_one_line(monkeypatch):
    """What each worker of the agents above sees without TORCH_DISABLE_SHARE_RDZV_TCP_STORE (the variables of
    torch/distributed/elastic/agent/server/local_elastic_agent.py, `_start_workers`)."""
    for key, value in {
        'TORCHELASTIC_RESTART_COUNT': '0',
        'TORCHELASTIC_MAX_RESTARTS': '1',
        'TORCHELASTIC_USE_AGENT_STORE': 'True',
        'GROUP_WORLD_SIZE': '2',
        'RANK': '0',
        'WORLD_SIZE': '2',
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match='TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node') as e:
        dist._init_on_restart_store('gloo', None)
    assert '\n' not in str(e.value)
    monkeypatch.setenv('TORCHELASTIC_USE_AGENT_STORE', 'False')  # what TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives
    dist._init_on_restart_store('gloo', None)  # returns: torch makes the group on each round's own store
