"""The resolved configs written into a run folder, so that a run can be read and repeated from the folder alone."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..storage.atomic_write import atomic_write_text


def write_run_files(run_dir: Path, cfg, ds: dict, step: int) -> None:
    """config.yaml and ds_config.json; a resumed run adds its own pair (`.resume_<step>`) beside the first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    suffix = '' if step == 0 else f'.resume_{step:08d}'
    atomic_write_text(run_dir / f'config{suffix}.yaml', yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(run_dir / f'ds_config{suffix}.json', json.dumps(ds, indent=2))
