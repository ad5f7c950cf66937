"""cmae_ds.kernels.optim.jit_ops: whether a DeepSpeed op is built, and which build locks are stale (a build killed by
a time limit under torch's former lock file blocked every later build of that op)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time

from cmae_ds.kernels.optim import jit_ops


def _lock(root, name: str, age_s: float = 0.0):
    (root / name).mkdir()
    lock = root / name / 'lock'
    lock.write_text('')
    if age_s:
        os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_only_locks_nothing_holds_are_removed(tmp_path):
    stale = _lock(tmp_path, 'fused_adam', age_s=600)
    fresh = _lock(tmp_path, 'cpu_adam')  # a build that has just taken the old-style lock
    held = _lock(tmp_path, 'held', age_s=600)  # torch's current lock: flock, released by the kernel on death
    building = _lock(tmp_path, 'building', age_s=600)  # an old-style build with ninja working in its folder
    ninja = subprocess.Popen(['sleep', '60'], cwd=building.parent)
    with open(held) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            time.sleep(0.2)  # the child's cwd is readable in /proc once it runs
            assert jit_ops.clear_stale_locks(tmp_path) == [stale]
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            ninja.kill()
            ninja.wait()
    assert not stale.exists() and fresh.exists() and held.exists() and building.exists()
    assert jit_ops.clear_stale_locks(tmp_path) == [building, held]  # once nothing holds them


def test_ready_says_whether_a_first_use_would_compile(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    assert jit_ops.build_dir('fused_adam') == tmp_path / 'fused_adam'
    assert not jit_ops.is_built('fused_adam') and jit_ops.main(['ready', 'fused_adam']) == 1
    (tmp_path / 'fused_adam' / 'fused_adam.so').write_bytes(b'')
    assert jit_ops.is_built('fused_adam') and jit_ops.main(['ready', 'fused_adam']) == 0
    assert jit_ops.main(['ready', 'lamb']) == 2
