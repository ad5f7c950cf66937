"""Find the images of a folder that cannot be decoded, and write a clean file list and a report of the bad ones.

    python launch/scan_dataset.py data/ImageNet/train --out train_clean.txt --workers 16

Every image is decoded in full, in parallel (truncated or corrupt JPEG, non-image, zero bytes are caught); the clean
list is for data.source=filelist data.root=ROOT data.ann_file=OUT.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmae_ds.data.scan import scan_folder  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('root', help='ImageNet-style folder: ROOT/<class>/<image>')
    ap.add_argument('--out', required=True, help='clean file list to write (paths relative to ROOT, label)')
    ap.add_argument('--report', default=None, help='bad files, "path<TAB>reason" a line (default OUT.bad.txt)')
    ap.add_argument('--workers', type=int, default=4)
    return ap.parse_args(argv)


def main() -> None:
    args = parse()
    t = time.time()
    result = scan_folder(args.root, args.out, args.workers, args.report)
    report = args.report or f'{args.out}.bad.txt'
    print(
        f'scanned {len(result.good) + len(result.bad)} files in {time.time() - t:.1f}s: {len(result.good)} '
        f'readable -> {args.out}; {len(result.bad)} unreadable -> {report}'
    )
    for path, reason in result.bad[:20]:
        print(f'  {path}: {reason}')
    if len(result.bad) > 20:
        print(f'  ... {len(result.bad) - 20} more in {report}')


if __name__ == '__main__':
    main()
