#!/usr/bin/env python
"""Fine-tune a pretrained CMAE encoder (the official recipe of docs/spec.md section 9), or probe it linearly.

  python launch/finetune.py --config finetune_debug finetune.pretrained=runs/debug     # CPU smoke run
  deepspeed --num_gpus 8 launch/finetune.py --config finetune_vit_base --deepspeed_config ds_configs/zero1_bf16.json \\
      finetune.pretrained=runs/cmae_vit_base_300e/model.safetensors data.root=/data/imagenet/train \\
      val_data.root=/data/imagenet/val finetune.output_dir=runs/ft_b300
  deepspeed --num_gpus 8 launch/finetune.py --linear-probe --config linprobe_vit_base ...   # = launch/linear_probe.py

Trailing `section.key=value` arguments override the config (sections: model, data, val_data, finetune or linprobe).
The run folder gets model_best.safetensors and model_last.safetensors for launch/evaluate.py, and a model card
(README.md); see docs/finetune.md.
"""

import argparse

from cmae_ds.cli import add_classifier_arguments, exit_process, run_classifier, run_guarded


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--linear-probe',
        '--linear_probe',
        dest='linear_probe',
        action='store_true',
        help='linear probing (MAE protocol) instead of fine-tuning',
    )
    add_classifier_arguments(parser)
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    return run_guarded(lambda: run_classifier(args, 'linprobe' if args.linear_probe else 'finetune'))


if __name__ == '__main__':
    exit_process(main())
