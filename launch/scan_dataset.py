"""Find the images of a folder or of shards that cannot be decoded; write a clean file list (folders) and a report.

    python launch/scan_dataset.py data/ImageNet/train --out train_clean.txt --workers 16

Every image is decoded in full, in parallel (truncated or corrupt JPEG, non-image, zero bytes are caught); the clean
list is for data.source=filelist data.root=ROOT data.ann_file=OUT.

A folder of webdataset shards (data.source=shards) is scanned in place: every shard walked and checksummed (a
truncated or corrupt one stops with one line naming it and its first bad key), every record decoded, and the index
rewritten with the undecodable records marked excluded (beside the shards, or in the index cache when ROOT is
read-only). Every pipeline (dali, torch_gpu, torch) then leaves them out of the epoch, as a clean file list leaves
out a folder's bad files: each costs one sample, and the epoch's order (so resume) is a function of what is left.
The bad records are listed in --report (default ROOT/shards.bad.txt); samples without an image, keys that come back
and extra image members (webdataset's grouping) are counted and printed. A record that goes bad after the scan is
still substituted by torch and torch_gpu and stops DALI, as a bad file does.

    python launch/scan_dataset.py data/ImageNet/train_shards --workers 16
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmae_ds.data.sources.scan import scan_folder, scan_shards  # noqa: E402
from cmae_ds.data.sources.shard_index import shard_names  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('root', help='ImageNet-style folder: ROOT/<class>/<image>, or a folder of .tar shards')
    ap.add_argument('--out', help='clean file list to write (paths relative to ROOT, label); not for shards')
    ap.add_argument('--report', default=None, help='bad files, "path<TAB>reason" a line (default OUT.bad.txt)')
    ap.add_argument('--workers', type=int, default=4)
    return ap.parse_args(argv)


def main() -> int:
    args = parse()
    t = time.time()
    if shard_names(Path(args.root)):
        result = scan_shards(args.root, args.workers, args.report)
        report, clean = result.report, 'the index'
    else:
        if not args.out:
            sys.exit('scan_dataset.py: --out is required for an image folder')
        result = scan_folder(args.root, args.out, args.workers, args.report)
        report, clean = args.report or f'{args.out}.bad.txt', args.out
    print(
        f'scanned {len(result.good) + len(result.bad)} files in {time.time() - t:.1f}s: {len(result.good)} '
        f'readable -> {clean}; {len(result.bad)} unreadable -> {report}'
    )
    for note in getattr(result, 'notes', []):
        print(f'  note: {note}')
    for path, reason in result.bad[:20]:
        print(f'  {path}: {reason}')
    if len(result.bad) > 20:
        print(f'  ... {len(result.bad) - 20} more in {report}')
    return 0


if __name__ == '__main__':
    from cmae_ds.cli import run_guarded

    sys.exit(run_guarded(main))
