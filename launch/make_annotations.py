"""Write the official CMAE annotation JSON (`ImageNet_train.json` style) from an ImageNet-style folder.

    python launch/make_annotations.py data/ImageNet/train data/ImageNet/ImageNet_train.json --prefix train

Entries are {"prefix": P, "filename": "<class>/<image>", "label": i} (labels by sorted class folder); the
official loader reads data_root/prefix/filename, so with --prefix train set data.root to data/ImageNet.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmae_ds.data.sources.scan import make_annotations  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('root', help='ImageNet-style folder: ROOT/<class>/<image>')
    ap.add_argument('out', help='annotation JSON to write')
    ap.add_argument('--prefix', default='', help="stored in every entry (official layout: 'train' or 'val')")
    return ap.parse_args(argv)


def main() -> None:
    args = parse()
    n = make_annotations(args.root, args.out, args.prefix)
    print(f'wrote {n} entries to {args.out}')


if __name__ == '__main__':
    main()
