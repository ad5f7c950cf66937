"""Pack an image source (folder, official JSON, file list) into webdataset shards and their index.

The shards are for data.source=shards data.root=OUT.

    python launch/make_shards.py data/ImageNet/train data/ImageNet/train_shards --workers 8
    python launch/make_shards.py data/ImageNet data/shards --source json --ann-file meta/ImageNet_train.json

Each shard holds '<key>.jpg' (the original bytes) and '<key>.cls' per image, in the source's order; the index
(shards.index.npz) sits beside them. A rerun after an interruption writes only the shards that are missing. The
shards are plain webdataset tars: webdataset.WebDataset reads them (tests/test_shards_at_scale.py).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('src', help='the image folder (for --source json/filelist: the folder paths start from)')
    ap.add_argument('out', help='folder for the shards: new, empty, or an interrupted packing of the same source')
    ap.add_argument('--source', default='folder', choices=('folder', 'json', 'filelist'))
    ap.add_argument('--ann-file', default='', help='the annotation JSON or file list (--source json/filelist)')
    ap.add_argument('--shard-size', type=float, default=1.0, help='GB per shard (default 1)')
    ap.add_argument('--workers', type=int, default=4, help='processes writing shards at once')
    ap.add_argument('--no-progress', action='store_true')
    return ap.parse_args(argv)


def main() -> int:
    from cmae_ds.config import DataConfig
    from cmae_ds.data.sources.files import list_samples
    from cmae_ds.data.sources.packing import pack

    args = parse()
    cfg = DataConfig(source=args.source, root=args.src, ann_file=args.ann_file)
    t = time.time()
    samples = list_samples(cfg)
    index, written = pack(samples, args.out, int(args.shard_size * 1e9), args.workers, not args.no_progress)
    gb = sum(s['size'] for s in index.shards) / 1e9
    print(
        f'{len(index)} images in {len(index.shards)} shards ({gb:.2f} GB) in {args.out}; {written} shard(s) written '
        f'now, {time.time() - t:.1f}s. Train with data.source=shards data.root={args.out}'
    )
    return 0


if __name__ == '__main__':
    from cmae_ds.cli import run_guarded

    sys.exit(run_guarded(main))
