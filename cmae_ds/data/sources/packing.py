"""Pack any file source (folder, official json, file list) into webdataset shards with their index (make_shards).

Layout: OUT/shard-000000.tar ... each holding, per sample, '<key>.jpg' (or '.png', ...: the original file's bytes,
untouched) and '<key>.cls' (the label as text; left out for unlabelled samples), plus OUT/shards.index.npz.
key = '<9-digit sample index>_<file stem>'. The order is the source's; which sample goes into which shard is fixed
before anything is written (by the file sizes and the shard size), so shards are written in parallel, their bytes
do not depend on the number of workers (tar headers carry no time or owner), and a rerun writes only the shards
whose record is missing: .pack/ in OUT holds the plan's fingerprint and one record per finished shard until the
index is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ..errors import PackError
from .files import Sample
from .shard_index import INDEX_NAME, VERSION, Index, build_index, read_index, save_index

PACK_DIR = '.pack'
BLOCK = 512


def member_ext(head: bytes, path: str) -> str:
    if head[:3] == b'\xff\xd8\xff':
        return 'jpg'
    if head[:8] == b'\x89PNG\r\n\x1a\n':
        return 'png'
    ext = Path(path).suffix.lower().lstrip('.')
    return 'jpg' if ext == 'jpeg' else ext or 'bin'


def sample_key(i: int, path: str) -> str:
    return f'{i:09d}_' + re.sub(r'[^A-Za-z0-9_-]', '_', Path(path).name.split('.')[0])[:80]


def _tar_bytes(size: int) -> int:
    return BLOCK + -(-size // BLOCK) * BLOCK


def plan_shards(sizes: list[int], labels: list[int], shard_bytes: int) -> list[list[int]]:
    """Consecutive sample indices per shard: a shard is closed before the sample that would take it past
    shard_bytes (a sample larger than that gets a shard of its own)."""
    shards, cur, used = [], [], 0
    for i, (size, label) in enumerate(zip(sizes, labels)):
        need = _tar_bytes(size) + (_tar_bytes(len(str(label))) if label >= 0 else 0)
        if cur and used + need > shard_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += need
    if cur:
        shards.append(cur)
    return shards


class _CrcWriter:
    """The file object tarfile writes through: CRC-32 of everything written, without reading the shard back."""

    def __init__(self, f):
        self.f, self.crc = f, 0

    def write(self, b) -> int:
        self.crc = zlib.crc32(b, self.crc)
        return self.f.write(b)

    def tell(self) -> int:
        return self.f.tell()


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0
    return info


def write_shard(path: str, items: list[tuple[int, str, int]]) -> tuple[dict, list]:
    """Write one shard of (sample index, file, label) items; -> (shard description, walk_shard-style records)."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    records = []
    with open(tmp, 'wb') as raw:
        w = _CrcWriter(raw)
        with tarfile.open(fileobj=w, mode='w', format=tarfile.GNU_FORMAT) as tf:
            for i, file, label in items:
                with open(file, 'rb') as f:
                    size = os.fstat(f.fileno()).st_size
                    name = f'{sample_key(i, file)}.{member_ext(f.read(8), file)}'
                    f.seek(0)
                    tf.addfile(_info(name, size), f)
                records.append((name, tf.offset - -(-size // BLOCK) * BLOCK, size, label))
                if label >= 0:
                    text = str(label).encode()
                    tf.addfile(_info(f'{sample_key(i, file)}.cls', len(text)), _Bytes(text))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    st = path.stat()
    return dict(name=path.name, size=st.st_size, mtime_ns=st.st_mtime_ns, crc32=w.crc), records


class _Bytes:
    def __init__(self, b: bytes):
        self.b = b

    def read(self, n: int = -1) -> bytes:
        out, self.b = (self.b, b'') if n < 0 else (self.b[:n], self.b[n:])
        return out


def fingerprint(samples: list[Sample], sizes: list[int], shard_bytes: int) -> str:
    h = hashlib.sha1(f'{VERSION} {shard_bytes}\n'.encode())
    for (path, label), size in zip(samples, sizes):
        h.update(f'{path}\t{label}\t{size}\n'.encode())
    return h.hexdigest()


def check_out(out: Path, fp: str) -> str:
    """'done', 'resume' or 'new'; refuses a folder that holds another dataset or another packing."""
    if not out.exists() or not any(out.iterdir()):
        return 'new'
    if (out / INDEX_NAME).is_file():
        if read_index(out / INDEX_NAME).meta.get('fingerprint') == fp:
            return 'done'
        raise PackError(f'{out} holds shards of another dataset (or another --shard-size); choose an empty folder')
    plan = out / PACK_DIR / 'plan.json'
    if plan.is_file():
        if json.loads(plan.read_text()).get('fingerprint') == fp:
            return 'resume'
        raise PackError(
            f'{out} holds an unfinished packing of another dataset (or --shard-size); choose another folder'
        )
    raise PackError(f'{out} is not empty and holds no shards of this dataset ({next(out.iterdir()).name}, ...)')


def pack(samples: list[Sample], out, shard_bytes: int = 10**9, workers: int = 4, progress: bool = True) -> tuple:
    """Write the shards and index of `samples` into `out`; -> (index, shards written now)."""
    out = Path(out)
    try:
        return _pack(samples, out, shard_bytes, workers, progress)
    except OSError as e:  # a source file gone or unreadable, a full disk: one line, naming the file
        raise PackError(f'make_shards: {e}') from e


def _pack(samples: list[Sample], out: Path, shard_bytes: int, workers: int, progress: bool) -> tuple:
    with ProcessPoolExecutor(max(1, workers)) as pool:
        sizes = list(pool.map(os.path.getsize, [p for p, _ in samples], chunksize=256))
        fp = fingerprint(samples, sizes, shard_bytes)
        state = check_out(out, fp)
        if state == 'done':
            return read_index(out / INDEX_NAME), 0
        work = out / PACK_DIR
        work.mkdir(parents=True, exist_ok=True)
        (work / 'plan.json').write_text(json.dumps(dict(fingerprint=fp, samples=len(samples))))
        plan = plan_shards(sizes, [lab for _, lab in samples], shard_bytes)
        todo = [s for s in range(len(plan)) if not _finished(out, s)]
        bar = _bar(progress, sum(sizes[i] for s in todo for i in plan[s]), len(plan) - len(todo), len(plan))
        jobs = {
            pool.submit(write_shard, str(out / shard_name(s)), [(i, *samples[i]) for i in plan[s]]): s for s in todo
        }
        failed = None
        for job in as_completed(jobs):
            s = jobs[job]
            if job.exception() is not None:  # the others are still recorded: a rerun writes only this one
                failed = failed or job.exception()
                continue
            desc, records = job.result()
            _write_json(work / f'{shard_name(s)}.json', dict(desc=desc, records=records))
            bar.update(sum(sizes[i] for i in plan[s]))
        bar.close()
        if failed is not None:
            raise failed
    index = _assemble(out, len(plan), fp)
    shutil.rmtree(work)
    return index, len(todo)


def shard_name(s: int) -> str:
    return f'shard-{s:06d}.tar'


def _finished(out: Path, s: int) -> bool:
    rec, tar = out / PACK_DIR / f'{shard_name(s)}.json', out / shard_name(s)
    if not rec.is_file() or not tar.is_file():
        return False
    return json.loads(rec.read_text())['desc']['size'] == tar.stat().st_size


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _assemble(out: Path, n: int, fp: str) -> Index:
    recs = [json.loads((out / PACK_DIR / f'{shard_name(s)}.json').read_text()) for s in range(n)]
    index = build_index(out, [r['desc'] for r in recs], [[tuple(x) for x in r['records']] for r in recs])
    index.meta['fingerprint'] = fp
    save_index(index, out / INDEX_NAME)
    return index


def _bar(progress: bool, total: int, done: int, shards: int):
    from tqdm import tqdm

    desc = f'shards ({done} of {shards} already written)' if done else 'shards'
    return tqdm(total=total, unit='B', unit_scale=True, desc=desc, disable=not progress)
