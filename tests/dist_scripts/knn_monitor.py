"""Run by tests/test_knn.py: pretrain() with a KnnMonitor as its observer, the way launch/pretrain.py would wire it.

  python tests/dist_scripts/knn_monitor.py DS_JSON TRAIN_FOLDER VAL_FOLDER [section.key=value ...]
"""
import json
import sys
from pathlib import Path

from cmae_ds.config import DataConfig, KnnConfig, load_config
from cmae_ds.engine.knn import KnnMonitor
from cmae_ds.engine.pretrain import train

ds, train_root, val_root, *overrides = sys.argv[1:]
cfg = load_config(None, overrides)
data = dict(source='folder', pipeline='torch', num_workers=0)
monitor = KnnMonitor(KnnConfig(every_steps=2, batch_size=8), DataConfig(root=train_root, **data),
                     DataConfig(root=val_root, **data), cfg.model.img_size, run_dir=Path(cfg.train.output_dir))
result = train(cfg, ds, observer=monitor)
monitor.close()
print('MONITOR', json.dumps([[step, r.as_dict()] for step, r in monitor.history]))
