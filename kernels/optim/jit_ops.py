"""DeepSpeed's JIT-built ops (fused_adam, cpu_adam, ...): is one built, build it ahead of time, clear a stale lock.

  python -m cmae_ds.kernels.optim.jit_ops build fused_adam    # (stale locks cleared first), minutes the first time
  python -m cmae_ds.kernels.optim.jit_ops ready fused_adam    # exit 0 when built, 1 when a first use would compile

A first FusedAdam compiles with nvcc inside whatever step builds the optimizer; launch/gpu_checks.sh builds it in a
step of its own instead, and its timed steps use torch's fused AdamW when that build did not finish. torch before
the filelock-based build lock (torch/utils/cpp_extension.py, `FileLock(os.path.join(build_directory, 'lock'))`)
used a lock file whose mere existence blocks (torch/utils/file_baton.py, FileBaton.wait), so a build killed by a
time limit left every later build of that op waiting forever: `clear_stale_locks` removes such a file when nothing
is building.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import sys
import time
from pathlib import Path

# deepspeed_shm_comm: the CPU accelerator's collectives, built by the first process group on a CPU machine.
BUILDERS = {'fused_adam': 'FusedAdamBuilder', 'cpu_adam': 'CPUAdamBuilder', 'deepspeed_shm_comm': 'ShareMemCommBuilder'}


def build_dir(op: str) -> Path:
    """Where torch's cpp_extension builds `op` (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/<python, cuda>)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op, verbose=False))


def is_built(op: str) -> bool:
    """Prebuilt into the DeepSpeed wheel, or JIT-built and cached: a first use loads it without compiling."""
    if importlib.util.find_spec('deepspeed') is None:
        return False
    if importlib.util.find_spec(f'deepspeed.ops.adam.{op}_op') is not None:
        return True
    return (build_dir(op) / f'{op}.so').is_file()


def _cwds() -> set[Path]:
    """The working directories of the running processes we can see (ninja builds with cwd = the build folder)."""
    cwds = set()
    for proc in Path('/proc').iterdir():
        if proc.name.isdigit():
            try:
                cwds.add(Path(os.readlink(proc / 'cwd')))
            except OSError:
                pass  # gone, or not ours to read
    return cwds


def _flock_held(path: Path) -> bool:
    try:
        with open(path, 'a') as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return True  # unreadable: leave it
    return False


def clear_stale_locks(root: Path, min_age_s: float = 30.0) -> list[Path]:
    """Remove root/<op>/lock files nothing holds: none held with flock (torch's current lock), no process working in
    that folder (a build under the old lock file runs ninja there), and older than `min_age_s` (a build that
    has just taken the old lock and not yet started ninja). Returns what was removed."""
    removed = []
    busy = _cwds()
    for lock in sorted(Path(root).glob('*/lock')):
        if lock.parent in busy or time.time() - lock.stat().st_mtime < min_age_s or _flock_held(lock):
            continue
        lock.unlink(missing_ok=True)
        removed.append(lock)
    return removed


def lock_file_blocks() -> bool:
    """True under a torch whose build lock is a file whose existence blocks (FileBaton), which a killed build leaves
    behind; torch's flock-based lock is released by the kernel when its holder dies, and its file is left alone."""
    import torch.utils.cpp_extension as cpp_extension

    return hasattr(cpp_extension, 'FileBaton')


def build(op: str) -> Path:
    """Build `op` for the current accelerator (after clearing stale locks of the old kind) -> its build folder."""
    if lock_file_blocks():
        for lock in clear_stale_locks(build_dir(op).parent):
            print(f'removed stale build lock {lock}')
    import deepspeed.ops.op_builder as builders

    getattr(builders, BUILDERS[op])().load(verbose=False)
    return build_dir(op)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ('build', 'ready') or argv[1] not in BUILDERS:
        print(f'usage: python -m cmae_ds.kernels.optim.jit_ops build|ready {"|".join(BUILDERS)}', file=sys.stderr)
        return 2
    action, op = argv
    if action == 'build':
        print(f'{op} built in {build(op)}')
        return 0
    ready = is_built(op)
    print(f'{op}: {"built" if ready else "not built"} ({build_dir(op)})')
    return 0 if ready else 1


if __name__ == '__main__':
    sys.exit(main())
