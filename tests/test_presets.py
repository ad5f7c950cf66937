"""Every YAML preset loads; every DeepSpeed JSON validates for the world size it is meant for."""

import json
from pathlib import Path

import pytest

from cmae_ds.config import PRESET_DIR, load_config
from cmae_ds.config.ds_config import load_ds_config, validate
from cmae_ds.engine.schedules import scaled_lr

REPO = Path(__file__).resolve().parents[1]
DS_DIR = REPO / 'ds_configs'
PRESETS = sorted(p.stem for p in PRESET_DIR.glob('*.yaml'))
GPU_CONFIGS = ['zero1_bf16', 'zero2_bf16', 'zero3_bf16', 'zero2_fp16', 'zero3_offload_bf16']

# name -> (size, mode, epochs)
OFFICIAL = {
    'cmae_vit_base_300e': ('vit_base', 'cmae', 300),
    'cmae_vit_base_800e': ('vit_base', 'cmae', 800),
    'cmae_vit_base_1600e': ('vit_base', 'cmae', 1600),
    'mae_vit_base_300e': ('vit_base', 'mae', 300),
    'mae_vit_base_1600e': ('vit_base', 'mae', 1600),
    'cmae_vit_large_1600e': ('vit_large', 'cmae', 1600),
    'cmae_vit_huge_1600e': ('vit_huge', 'cmae', 1600),
}


def test_expected_files_exist():
    assert set(OFFICIAL) | {'debug'} <= set(PRESETS)
    assert {f'{n}.json' for n in GPU_CONFIGS + ['cpu_debug']} <= {p.name for p in DS_DIR.glob('*.json')}


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_official_presets(name):
    cfg = load_config(name)
    size, mode, epochs = OFFICIAL[name]
    assert (cfg.model.size, cfg.model.mode, cfg.train.epochs) == (size, mode, epochs)
    assert cfg.model.img_size == 224
    assert cfg.model.mask_ratio == (0.65 if mode == 'cmae' else 0.75)
    assert cfg.train.warmup_epochs == 40
    assert cfg.train.base_lr == 1.5e-4 and cfg.train.warmup_start_factor == 1e-4 and cfg.train.min_lr == 0.0
    assert cfg.train.weight_decay == 0.05 and cfg.train.betas == (0.9, 0.95)
    assert cfg.train.momentum_base == cfg.train.momentum_end == 0.996
    assert cfg.data.source == 'folder' and cfg.data.root  # a placeholder the user overrides
    assert load_config(name, ['data.root=/data/in1k/train']).data.root == '/data/in1k/train'


def test_debug_preset_is_the_embedded_default():
    cfg = load_config('debug')
    assert (cfg.model.size, cfg.model.mode, cfg.data.source) == ('debug', 'cmae', 'embedded')
    assert cfg.model.grid_size % 2 == 0 and cfg.model.num_visible > 0
    assert cfg.train.epochs <= 50 and cfg.train.warmup_epochs < cfg.train.epochs


@pytest.mark.parametrize('name', GPU_CONFIGS)
def test_gpu_configs_give_the_official_global_batch_on_32_gpus(name):
    path = str(DS_DIR / f'{name}.json')
    r = validate(load_ds_config(path), load_config('cmae_vit_base_300e'), 32, path=path)
    assert r.global_batch == 4096
    assert scaled_lr(1.5e-4, r.global_batch) == pytest.approx(2.4e-3)
    assert r.precision == ('fp16' if 'fp16' in name else 'bf16')
    assert r.zero_stage == int(name[4])
    assert r.offload_optimizer == ('offload' in name)
    # The same file works on one 8-GPU node too (global batch = micro x accum x 8).
    assert validate(load_ds_config(path), load_config('cmae_vit_base_300e'), 8, path=path).global_batch == 1024


@pytest.mark.parametrize('world', [1, 2])
def test_cpu_debug_validates_with_debug_preset(world):
    path = str(DS_DIR / 'cpu_debug.json')
    r = validate(load_ds_config(path), load_config('debug'), world, path=path)
    assert (r.micro_batch, r.grad_accum, r.global_batch) == (8, 1, 8 * world)
    assert (r.precision, r.zero_stage, r.offload_optimizer) == ('fp32', 0, False)


@pytest.mark.parametrize('name', GPU_CONFIGS + ['cpu_debug'])
def test_common_settings(name):
    ds = json.loads((DS_DIR / f'{name}.json').read_text())
    assert 'train_batch_size' not in ds  # derived from micro x accum x world size
    assert ds['gradient_clipping'] == 0.0  # the official CMAE config sets no clip_grad
    assert ds['steps_per_print'] >= 10**6 and ds['wall_clock_breakdown'] is False
    assert 'optimizer' not in ds and 'scheduler' not in ds


def test_fp16_dynamic_loss_scaling_is_the_official_one():
    """The official configs' AmpOptimWrapper(loss_scale='dynamic') builds a bare GradScaler() (mmengine
    optim/optimizer/amp_optimizer_wrapper.py), so its law is torch.amp.GradScaler's defaults, read here: start at
    init_scale, halve at the first overflow (no hysteresis), double after growth_interval clean steps."""
    import inspect

    import torch

    defaults = {k: v.default for k, v in inspect.signature(torch.amp.GradScaler.__init__).parameters.items()}
    fp16 = json.loads((DS_DIR / 'zero2_fp16.json').read_text())['fp16']
    assert fp16['enabled'] is True and fp16['loss_scale'] == 0  # dynamic
    assert 2 ** fp16['initial_scale_power'] == defaults['init_scale']
    assert fp16['loss_scale_window'] == defaults['growth_interval']
    assert fp16['hysteresis'] == 1 and defaults['backoff_factor'] == 0.5 and defaults['growth_factor'] == 2.0
    assert fp16['min_loss_scale'] == 1  # GradScaler has no floor; DeepSpeed needs one (a documented difference)


def test_offload_config_pins_memory():
    off = json.loads((DS_DIR / 'zero3_offload_bf16.json').read_text())['zero_optimization']['offload_optimizer']
    assert off == {'device': 'cpu', 'pin_memory': True}
