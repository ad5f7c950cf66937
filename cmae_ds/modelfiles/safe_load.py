"""Read checkpoint files without letting them run code: every file the project (and DeepSpeed, on resume) unpickles
goes through `load_checkpoint_file`.

A pickle can import and call any function it names. Before anything is unpickled, `scan` lists every global the
file's pickles name (pickletools over each pickle of the file, STACK_GLOBAL operands followed through the memo) and
refuses the file with `UnsafeCheckpoint` unless each one is allowed: torch's own weights-only set (tensor rebuilders,
containers, dtypes), numpy's array and scalar reconstruction, the four DeepSpeed classes its optimizer states hold,
and the metadata classes of the OpenMMLab packages that official checkpoints carry (message hubs, history buffers),
which become inert placeholders and are never imported. The file is then read by torch's weights-only unpickler
with exactly those globals added, so two independent checks stand between a file and code execution.
`trust=True` (`--trust-checkpoint` on the launch scripts) skips both, loudly, for files the user vouches for.
"""

from __future__ import annotations

import importlib
import io
import logging
import pickletools
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

log = logging.getLogger(__name__)

OPT_OUT = '--trust-checkpoint (Python: trust=True)'


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model it is loaded into."""


class UnsafeCheckpoint(CheckpointError):
    """The file names globals that unpickling would import and could call: it is not loaded."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names = path, names
        super().__init__(
            f'{path}: refused, not unpickled: it names {", ".join(names)}, which loading would import '
            f'and could call to run code. Only if you trust where the file comes from: {OPT_OUT}'
        )


# Loaded as the real objects (besides torch's weights-only defaults); each only rebuilds data.
_NUMPY = (
    'numpy._core.multiarray._reconstruct',
    'numpy._core.multiarray.scalar',
    'numpy.ndarray',
    'numpy.dtype',
    'numpy.core.multiarray._reconstruct',
    'numpy.core.multiarray.scalar',
)  # numpy 2 and numpy 1 names
_DEEPSPEED = (
    'deepspeed.runtime.fp16.loss_scaler.LossScaler',
    'deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler',
    'deepspeed.runtime.zero.config.ZeroStageEnum',
    'deepspeed.utils.tensor_fragment.fragment_address',
)
# Official (mmengine-based) checkpoints' metadata: placeholders that keep the state they are given.
PLACEHOLDER_PACKAGES = ('mmengine', 'mmcv', 'mmselfsup', 'mmpretrain', 'mmcls')
UNRESOLVED = '<a global whose name is computed while unpickling>'


class Placeholder:
    """Stands in for a metadata class the file names; never imported, it only keeps what it was given."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


_TEXT = {'SHORT_BINUNICODE', 'BINUNICODE', 'BINUNICODE8', 'UNICODE', 'STRING', 'BINSTRING', 'SHORT_BINSTRING'}
_GET = {'GET', 'BINGET', 'LONG_BINGET'}
_PUT = {'PUT', 'BINPUT', 'LONG_BINPUT'}


def pickle_globals(stream, found: Optional[set] = None) -> set[str]:
    """`module.name` of every global one pickle (read from `stream`, left just after its STOP) would import, added
    to `found` as they come (a pickle that turns out malformed still shows what it named up to there).

    STACK_GLOBAL takes its operands from the stack: they are known when the two values pushed just before it are
    strings, literal or from the memo (how every pickler writes them); otherwise UNRESOLVED is reported."""
    found = set() if found is None else found
    memo, pushed = {}, []  # pushed: the last <= 2 values on the stack when known to be strings
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == 'MEMOIZE' or name in _PUT:
            memo[len(memo) if name == 'MEMOIZE' else arg] = pushed[-1] if pushed else None
        elif name in ('FRAME', 'PROTO'):
            pass  # neither touches the stack
        elif name in _TEXT or name in _GET:
            value = memo.get(arg) if name in _GET else arg
            pushed = (pushed + [value if isinstance(value, str) and value.isascii() else None])[-2:]
        else:
            found.update(_named_by(name, arg, pushed))
            pushed = []
    return found


def _named_by(op: str, arg: Any, pushed: list) -> set[str]:
    if op in ('GLOBAL', 'INST'):  # pickletools joins "module\nname\n" with a space
        parts = arg.split(' ')
        return {'.'.join(parts) if len(parts) == 2 and arg.isascii() else UNRESOLVED}
    if op == 'STACK_GLOBAL':
        return {'.'.join(pushed) if len(pushed) == 2 and None not in pushed else UNRESOLVED}
    if op.startswith('EXT'):
        return {f'<copyreg extension code {arg}>'}
    return set()


def _torch_allowed() -> set[str]:
    """Tensor rebuilders, containers, dtypes. One, _rebuild_from_type_v2 (ZeRO-3's flat fp32 groups, tensors with
    an attribute), calls a function the file names: that function must pass the same check."""
    from torch import _weights_only_unpickler

    return set(_weights_only_unpickler._get_allowed_globals())


def _is_placeholder(name: str) -> bool:
    return name.split('.')[0] in PLACEHOLDER_PACKAGES


def _refused(names: set[str]) -> list[str]:
    """The names of `names` that are neither allowed objects nor placeholders, sorted."""
    allowed = _torch_allowed() | set(_NUMPY) | set(_DEEPSPEED)
    return sorted(n for n in names if n not in allowed and not _is_placeholder(n))


def _pickles(path: Path) -> Iterator[io.BufferedIOBase]:
    """Every pickle torch.load would unpickle from the file, as streams: the .pkl records of a zip checkpoint; the
    five consecutive pickles (magic, protocol, system info, object, storage keys) of the legacy format."""
    with open(path, 'rb') as f:
        if f.read(4) == b'PK\x03\x04':  # torch's own test for its zip format
            f.seek(0)
            reader = torch._C.PyTorchFileReader(f)
            records = reader.get_all_records()
            if 'constants.pkl' in records:
                raise CheckpointError(f'{path}: a TorchScript archive, not a checkpoint (torch.jit.load runs its code)')
            if 'data.pkl' not in records:
                raise CheckpointError(f'{path}: a zip file without data.pkl, not a torch checkpoint')
            for record in sorted(r for r in records if r.endswith('.pkl')):
                yield io.BytesIO(reader.get_record(record))
            return
        f.seek(0)
        for _ in range(5):
            yield f


def scan(path: Union[str, Path]) -> set[str]:
    """The globals the checkpoint at `path` names; raises UnsafeCheckpoint when one is not allowed and
    CheckpointError when the file is not a torch checkpoint. Reads the pickles only, not the tensor data."""
    path = Path(path)
    names: set[str] = set()
    unreadable = None
    try:
        for stream in _pickles(path):
            pickle_globals(stream, names)
    except CheckpointError:
        raise
    except Exception as e:  # pickletools, zip and OS errors all mean "not a torch checkpoint we can read"
        unreadable = CheckpointError(f'{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})')
    bad = _refused(names)
    if bad:  # also when the rest is malformed: a bare pickle.dump payload is a pickle, not a torch file
        raise UnsafeCheckpoint(path, bad)
    if unreadable is not None:
        raise unreadable
    return names


def _resolve(name: str) -> Any:
    module, attr = name.rsplit('.', 1)
    if module.startswith('numpy.core.'):  # numpy 1's name of numpy 2's numpy._core
        module = 'numpy._core.' + module[len('numpy.core.') :]
    return getattr(importlib.import_module(module), attr)


def _safe_globals(names: set[str]) -> list:
    """What torch's weights-only unpickler must additionally accept for a scanned file: the allowed objects it
    names, a placeholder class per metadata name, and numpy's dtype classes (BUILD checks the dtype's type)."""
    extra = []
    for name in sorted(names - _torch_allowed()):
        if _is_placeholder(name):
            module, attr = name.rsplit('.', 1)
            extra.append((type(attr, (Placeholder,), {'__module__': f'placeholder.{module}'}), name))
        else:
            extra.append((_resolve(name), name))
    if any(n.startswith('numpy.') for n in names):
        import numpy as np

        extra += [(cls, f'numpy.dtypes.{n}') for n, cls in vars(np.dtypes).items() if n.endswith('DType')]
    return extra


def load_checkpoint_file(
    path: Union[str, Path], *, trust: bool = False, map_location: Any = 'cpu', mmap: bool = False
) -> Any:
    """The object saved in a checkpoint file, after `scan` passed, read weights-only. `trust=True`: plain
    torch.load, which runs whatever the file's pickle calls; for files whose source the user vouches for."""
    path = Path(path)
    if trust:
        log.warning(f'{path}: loaded without the safety check (trusted by {OPT_OUT}); unpickling it can run code')
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    names = scan(path)
    try:
        with torch.serialization.safe_globals(_safe_globals(names)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f'{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})') from None


def _is_torch_file(path: Path) -> bool:
    """Named as one (DeepSpeed's are all .pt), or starting as one: a zip header, a pickle PROTO opcode."""
    if path.suffix in ('.pt', '.pth', '.bin', '.pkl'):
        return True
    with open(path, 'rb') as f:
        head = f.read(4)
    return head == b'PK\x03\x04' or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def scan_folder(folder: Union[str, Path], *, trust: bool = False) -> list[Path]:
    """Scan every torch file under `folder` (a DeepSpeed checkpoint tag: model and optimizer states, per-rank state,
    universal checkpoint shards), whatever its name; the files found. DeepSpeed's NVMe swap copies
    (offloaded_tensors/) are raw tensor bytes, copied back and never unpickled."""
    files = [
        p
        for p in sorted(Path(folder).rglob('*'))
        if p.is_file() and 'offloaded_tensors' not in p.relative_to(folder).parts[:-1] and _is_torch_file(p)
    ]
    if trust:
        log.warning(f'{folder}: {len(files)} checkpoint files not checked (trusted by {OPT_OUT})')
        return files
    for path in files:
        scan(path)
    return files


class _CheckedCheckpointEngine:
    """DeepSpeed's checkpoint engine with its `load` replaced by load_checkpoint_file; the rest is the original's."""

    def __init__(self, inner, trust: bool):
        self._inner, self._trust = inner, trust

    def load(self, path, map_location=None):
        return load_checkpoint_file(path, trust=self._trust, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextmanager
def checked_deepspeed_loads(engine, *, trust: bool = False):
    """Within the block, every file the DeepSpeed engine reads through its checkpoint engine (model states, ZeRO
    optimizer states) is scanned and read weights-only. DeepSpeed's torch engine itself uses weights_only=False."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _CheckedCheckpointEngine(inner, trust)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
