"""Fine-tuning trains as the official code trains: the project's real fine-tuning entry point (finetune.train with
the finetune_vit_base preset's rules, the real DeepSpeed engine, its parameter groups, schedule and loop) replays a
trajectory made by the OFFICIAL code's own mmengine Runner (tests/fixtures/finetune_official/make_fixture.py: the
official fine-tuning config, the repository's LearningRateDecayOptimWrapperConstructor, LinearLR + CosineAnnealingLR
per iteration; ViT 96 wide, 2 blocks with MLP 192, 64 px, 4 classes, 20 iterations, drop path and mixup off on
both sides).

Only the data and the starting weights are handed in: the fixture's batches instead of a folder, and its initial
weights (the official init) through the project's own official-classifier loader. Bounds: the same official run from
a 1-ulp perturbed start (the fixture's noise floor), per tensor and per step."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmae_ds.config.loading import load_task_config
from cmae_ds.engine.lr_decay import layer_decay_groups, official_name
from cmae_ds.modelfiles.formats import convert_official_classifier, load_official_classifier
from cmae_ds.tasks import finetune

from engine_helpers import write_ds
from helpers import model_state, rel
from run_recorder import one_rank_group

HERE = Path(__file__).resolve().parent / 'fixtures' / 'finetune_official'
PRESET = Path(finetune.__file__).resolve().parents[1] / 'presets' / 'finetune_vit_base.yaml'
# The measured 1-ulp floor times this, but never under the absolute floor below: a test that does not flake on
# another CPU's rounding, far under what any planted rule moves (docs/finetune.md, "Trains as the official code
# trains": the replay ends 1.4-2 x the floor away; each planted rule 16 x to 3e4 x the bound).
SLACK, ABS_FLOOR = 20.0, 2e-6


@pytest.fixture(scope='module')
def fx():
    tensors = load_file(HERE / 'finetune_official.safetensors')
    meta = json.loads((HERE / 'finetune_official.json').read_text())
    parts = ('init', 'final', 'exp_avg', 'exp_avg_sq')
    parts = {p: {k[len(p) + 1 :]: v for k, v in tensors.items() if k.startswith(p + '.')} for p in parts}
    return dict(meta=meta, images=tensors['images'], labels=tensors['labels'], **parts)


def task_config(fx, out: Path):
    m = fx['meta']
    model = m['model']
    over = [
        'model.size=debug',
        f'model.embed_dim={model["embed_dim"]}',
        f'model.depth={model["depth"]}',
        f'model.num_heads={model["num_heads"]}',
        f'model.mlp_ratio={model["mlp_ratio"]}',
        f'model.img_size={model["img_size"]}',
        f'model.patch_size={model["patch_size"]}',
        'model.compile=eager',
        f'finetune.num_classes={m["num_classes"]}',
        f'finetune.epochs={m["epochs"]}',
        f'finetune.warmup_epochs={m["warmup_epochs"]}',
        f'finetune.base_lr={m["peak_lr"] * 256 / m["batch"]}',  # the recipe's peak lr at this batch
        f'finetune.max_steps={m["iters_per_epoch"] * m["run_epochs"]}',
        'finetune.drop_path=0',
        'finetune.mixup=0',
        'finetune.cutmix=0',
        'finetune.eval_every_epochs=0',
        'finetune.progress_bar=false',
        f'finetune.output_dir={out}',
    ]
    return load_task_config('finetune', str(PRESET), over)


class FixtureLoader:
    """The fixture's batches, the same every epoch (the official DefaultSampler without shuffling)."""

    name = 'official fixture'

    def __init__(self, fx):
        m = fx['meta']
        mean = torch.tensor(m['mean'], dtype=torch.float32)[:, None, None]
        std = torch.tensor(m['std'], dtype=torch.float32)[:, None, None]
        img = (fx['images'].float() - mean) / std  # as make_fixture.normalize
        b = m['batch']
        self.batches = [{'img': img[i : i + b], 'label': fx['labels'][i : i + b]} for i in range(0, len(img), b)]

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch):
        pass

    def skip_batches(self, n):
        raise AssertionError('the replay never resumes')

    def __iter__(self):
        return iter(self.batches)


def group_key(group: dict) -> str:
    """The official constructor's group name for one of ours."""
    return f'layer_{group["layer_id"]}_{"decay" if group["weight_decay"] else "no_decay"}'


def replay(fx, tmp_path, monkeypatch) -> dict:
    cfg = task_config(fx, tmp_path / 'run')
    seen: dict = {'loss': [], 'lr': []}
    real_train_step, real_build_engine = finetune.train_step, finetune.build_engine

    def train_step(engine, batch, dtype, mixup, criterion):
        seen['lr'].append({group_key(g): g['lr'] for g in engine.optimizer.param_groups})
        loss = real_train_step(engine, batch, dtype, mixup, criterion)
        seen['loss'].append(float(loss.detach()))
        return loss

    def build_engine(*args, **kw):
        seen['engine'], model, name = real_build_engine(*args, **kw)
        return seen['engine'], model, name

    loader = FixtureLoader(fx)
    monkeypatch.setattr(finetune, '_loaders', lambda cfg, batch_cfg, ctx: (loader, loader))

    def build_model(cfg, trust=False):
        return load_official_classifier(fx['init'], cfg.model, cfg.task.num_classes)

    monkeypatch.setattr(finetune, 'build_model', build_model)
    monkeypatch.setattr(finetune, 'train_step', train_step)
    monkeypatch.setattr(finetune, 'build_engine', build_engine)
    with one_rank_group():
        seen['result'] = finetune.train(cfg, write_ds(tmp_path, train_micro_batch_size_per_gpu=fx['meta']['batch']))
    return seen


def bound(floor: float) -> float:
    return max(SLACK * floor, ABS_FLOOR)


def test_groups_are_the_official_constructors(fx):
    """Every parameter's lr scale and weight decay as the official LearningRateDecayOptimWrapperConstructor gave them
    (its table is in the fixture), from the preset's layer_decay and weight_decay."""
    cfg = task_config(fx, Path('unused'))
    model = load_official_classifier(fx['init'], cfg.model, cfg.task.num_classes)
    ours = {
        n: (g['lr_scale'], g['weight_decay'], group_key(g))
        for g in layer_decay_groups(
            model, weight_decay=cfg.task.weight_decay, layer_decay=cfg.task.layer_decay, depth=cfg.model.depth
        )
        for n in g['names']
    }
    official = {}
    for g in fx['meta']['groups']:
        for name in convert_official_classifier(dict.fromkeys(g['params'])):
            official[name] = (g['lr_scale'], g['weight_decay'], g['name'])
    assert ours.keys() == official.keys()
    for name, (scale, wd, key) in official.items():
        assert ours[name] == (pytest.approx(scale, rel=1e-12), wd, key), name
    assert tuple(fx['meta']['betas']) == cfg.task.betas and fx['meta']['eps'] == 1e-8  # build_adamw's eps


@pytest.mark.slow
def test_finetune_replays_the_official_trajectory(fx, tmp_path, monkeypatch):
    meta, floor = fx['meta'], fx['meta']['noise_floor_1ulp']
    seen = replay(fx, tmp_path, monkeypatch)
    steps = meta['iters_per_epoch'] * meta['run_epochs']
    assert seen['result'].steps == steps and len(seen['loss']) == steps

    for g, series in zip(meta['groups'], meta['lr']):  # the warm-up's end, the cosine, its common floor
        ours = [lrs[g['name']] for lrs in seen['lr']]
        assert ours == pytest.approx(series, rel=1e-9, abs=0), g['name']

    for k, (got, want) in enumerate(zip(seen['loss'], meta['loss'])):
        assert abs(got - want) / want <= bound(floor['loss'][k]), (k, got, want)

    final = model_state(seen['result'].last_file)  # the run's own fp32 model file
    assert final.keys() == {n for n, _ in seen['engine'].module.named_parameters()}
    for name, got in final.items():
        off = official_name(name)
        assert rel(got, fx['final'][off]) <= bound(floor['final'][off]), name

    engine = seen['engine']
    for name, p in engine.module.named_parameters():
        off, state = official_name(name), engine.optimizer.state[p]
        assert [float(state['step'])] == meta['adam_step'], name
        for key in ('exp_avg', 'exp_avg_sq'):
            assert rel(state[key], fx[key][off]) <= bound(floor[key][off]), (key, name)
