#!/usr/bin/env python
"""Linear probing (MAE protocol): `launch/finetune.py --linear-probe`; see docs/finetune.md.

  deepspeed --num_gpus 8 launch/linear_probe.py --config linprobe_vit_base \\
      --deepspeed_config ds_configs/linprobe_bf16.json linprobe.pretrained=runs/cmae_vit_base_300e/model.pt \\
      data.root=/data/imagenet/train val_data.root=/data/imagenet/val
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(linear_probe=True))
