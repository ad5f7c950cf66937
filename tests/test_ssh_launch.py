"""docs/cluster.md's multi-node launch for real: `deepspeed --hostfile` starting each "node" through pdsh and ssh.

The two nodes are two loopback addresses (127.0.0.2, 127.0.0.3) served by an sshd this test starts on a free port
with its own host key, user key and authorized_keys under tmp_path. The key and the port reach ssh through
`PDSH_SSH_ARGS_APPEND` (with `-F /dev/null` and a known_hosts file of its own), so the user's ssh files are neither
read nor written; `--no_ssh_check` because the launcher's own check runs plain `ssh HOST` without that variable.
The environment of the remote ranks comes from a `.deepspeed_env` file named by `DS_ENV_FILE`, as the page says.
Skips, saying why, where sshd, ssh or pdsh are missing (`.ci/run` installs them when apt can).
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from engine_helpers import DEEPSPEED, ROOT, TINY, env, tail, write_ds
from helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.dist]

NODES = ('127.0.0.2', '127.0.0.3')


def _sshd() -> str:
    return shutil.which('sshd') or next((p for p in ('/usr/sbin/sshd', '/sbin/sshd') if os.access(p, os.X_OK)), '')


def _tools() -> dict:
    tools = {'sshd': _sshd(), 'ssh': shutil.which('ssh'), 'ssh-keygen': shutil.which('ssh-keygen')}
    tools['pdsh'] = shutil.which('pdsh')
    missing = [name for name, path in tools.items() if not path]
    if missing:
        pytest.skip(f'{", ".join(missing)} not installed (apt-get install openssh-server pdsh)')
    return tools


def _keygen(tools: dict, path: Path) -> None:
    subprocess.run([tools['ssh-keygen'], '-q', '-t', 'ed25519', '-N', '', '-f', str(path)], check=True)


def _privsep_dir() -> None:
    """sshd started as root wants its privilege-separation folder, which only an init system creates."""
    if os.geteuid() == 0 and not Path('/run/sshd').is_dir():
        try:
            Path('/run/sshd').mkdir(mode=0o755, parents=True)
        except OSError as e:
            pytest.skip(f'sshd needs /run/sshd and it cannot be made: {e}')


def _ssh_args(d: Path, port: int) -> str:
    return (
        f'-F /dev/null -p {port} -i {d / "id_user"} -o IdentitiesOnly=yes -o BatchMode=yes '
        f'-o StrictHostKeyChecking=no -o UserKnownHostsFile={d / "known_hosts"} -o GlobalKnownHostsFile=/dev/null '
        '-o LogLevel=ERROR'
    )


@pytest.fixture
def sshd(tmp_path):
    """An sshd on 127.0.0.2 and 127.0.0.3 at a free port; yields the ssh options that reach it."""
    tools = _tools()
    _privsep_dir()
    d = tmp_path / 'ssh'
    d.mkdir(mode=0o700)
    _keygen(tools, d / 'host_key')
    _keygen(tools, d / 'id_user')
    (d / 'authorized_keys').write_text((d / 'id_user.pub').read_text())
    port = free_port()
    config = d / 'sshd_config'
    config.write_text(
        ''.join(f'ListenAddress {a}:{port}\n' for a in NODES)
        + f'HostKey {d / "host_key"}\nAuthorizedKeysFile {d / "authorized_keys"}\nPidFile {d / "sshd.pid"}\n'
        'PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n'
        'PermitRootLogin prohibit-password\n'
    )
    log = d / 'sshd.log'
    proc = subprocess.Popen([tools['sshd'], '-D', '-e', '-f', str(config)], stderr=log.open('w'))
    args = _ssh_args(d, port)
    try:
        for _ in range(50):
            probe = subprocess.run(
                [tools['ssh'], *args.split(), NODES[1], 'true'], capture_output=True, text=True, timeout=30
            )
            if probe.returncode == 0 or proc.poll() is not None:
                break
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.skip(f'sshd did not start here: {log.read_text().strip()[-500:]}')
        assert probe.returncode == 0, f'ssh to the test sshd failed: {probe.stderr}\nsshd: {log.read_text()[-2000:]}'
        yield args
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _home_ssh() -> list:
    home = Path(os.path.expanduser('~')) / '.ssh'
    return sorted((p.name, p.stat().st_mtime_ns) for p in home.iterdir()) if home.is_dir() else ['(absent)']


def test_two_nodes_through_pdsh_and_ssh(tmp_path, sshd):
    before = _home_ssh()
    hosts = tmp_path / 'hosts'
    hosts.write_text(''.join(f'{a} slots=1\n' for a in NODES))
    deepspeed_env = tmp_path / '.deepspeed_env'
    deepspeed_env.write_text('OMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=lo\n')
    e = env()
    e.update(PDSH_SSH_ARGS_APPEND=sshd, DS_ENV_FILE=str(deepspeed_env))
    cmd = [
        DEEPSPEED,
        '--hostfile',
        str(hosts),
        '--no_ssh_check',
        '--master_addr',
        NODES[0],
        '--master_port',
        str(free_port()),
        'launch/pretrain.py',
        '--deepspeed_config',
        write_ds(tmp_path),
        *TINY,
        'train.max_steps=2',
        f'train.output_dir={tmp_path / "run"}',
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    out = tail(proc, 8000)
    assert proc.returncode == 0, out
    assert 'export OMP_NUM_THREADS=1; export GLOO_SOCKET_IFNAME=lo;' in proc.stdout + proc.stderr, out
    for node in NODES:  # pdsh prefixes each remote line with its host: both nodes ran through ssh
        assert f'{node}: ' in proc.stdout, out
    assert 'global batch 8' in proc.stdout, out  # 2 nodes x 1 rank x micro 4
    assert (tmp_path / 'run' / 'checkpoints' / 'latest').read_text() == 'step_00000002'
    assert _home_ssh() == before  # nothing written into the user's ~/.ssh
