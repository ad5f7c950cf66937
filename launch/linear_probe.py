#!/usr/bin/env python
"""Linear probing (MAE protocol) of a pretrained encoder; the same as `launch/finetune.py --linear-probe`.

  deepspeed --num_gpus 8 launch/linear_probe.py --config linprobe_vit_base \\
      --deepspeed_config ds_configs/linprobe_bf16.json linprobe.pretrained=runs/cmae_vit_base_300e/model.safetensors \\
      data.root=/data/imagenet/train val_data.root=/data/imagenet/val

The run folder gets model_best.safetensors and model_last.safetensors for launch/evaluate.py, and a model card
(README.md); see docs/finetune.md.
"""

import argparse

from cmae_ds.cli import add_classifier_arguments, exit_process, run_classifier, run_guarded


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_classifier_arguments(parser)
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    return run_guarded(lambda: run_classifier(args, 'linprobe'))


if __name__ == '__main__':
    exit_process(main())
