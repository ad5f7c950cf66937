"""Replays a training trajectory made by the official code's own mmengine Runner
(tests/fixtures/official_trajectory/, made by make_official_trajectory.py there) through the project's real
pretraining entry point, `cmae_ds.tasks.pretrain.train`, with the real DeepSpeed engine (one rank, gloo) and
`ds_configs/cpu_debug.json`. Only what the fixture fixes is put in: its initial weights (through the official-key
converter), its batches (a loader of the fixture's images) and its masks (CMAE.random_mask returns the next one).
Everything that makes a training rule (parameter groups, lr schedule, momentum schedule and the step it is read at,
AdamW, the EMA, the loop) is the project's own."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cmae_ds.config import load_config
from cmae_ds.modelfiles.formats import convert_official_cmae, load_official_cmae
from cmae_ds.models import CMAE

from run_recorder import one_rank_group

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'official_trajectory'
LOSS_KEYS = ('loss', 'loss_rec', 'loss_con')
CALM = 1e-3  # tensors whose own noise floor is above this are rounding noise amplified by Adam (see the script)


def load_fixture(mode: str) -> dict:
    return torch.load(FIXTURES / f'official_{mode}_trajectory.pt', weights_only=True)


class FixedLoader:
    """The fixture's batches in order, every epoch the same (the official run used shuffle=False)."""

    name = 'fixture'

    def __init__(self, images, targets, batch):
        self.images, self.targets, self.batch = images, targets, batch

    def __len__(self):
        return self.images.shape[0] // self.batch

    def set_epoch(self, epoch):
        pass

    def skip_batches(self, n):
        raise AssertionError('the replay never resumes')

    def __iter__(self):
        for i in range(len(self)):
            s = slice(i * self.batch, (i + 1) * self.batch)
            batch = {'img': self.images[s]}
            batch['img_target'] = self.images[s] if self.targets is None else self.targets[s]
            yield batch


def official_start(fx: dict) -> dict:
    """The official state at step 0: the stored online weights, the target branch a copy of them (CMAE.init_weights)."""
    state = dict(fx['init'])
    for key in fx['final']:
        for target, online in (('target_backbone.', 'backbone.'), ('target_projector.', 'projector.')):
            if key.startswith(target):
                state[key] = fx['init'][online + key[len(target) :]]
    return state


@dataclass
class Replay:
    losses: list = field(default_factory=list)  # per step {'loss', 'loss_rec', 'loss_con'}
    lrs: list = field(default_factory=list)  # per step, every group's lr as the optimizer stepped
    momenta: list = field(default_factory=list)  # per step, the m the EMA was called with
    final: dict = field(default_factory=dict)  # our state dict after the run
    exp_avg: dict = field(default_factory=dict)  # our parameter name -> Adam's first moment
    exp_avg_sq: dict = field(default_factory=dict)


def overrides(fx: dict, tmp: Path) -> list:
    r, c = fx['run'], fx['config']
    model = [f'model.{k}={v}' for k, v in c.items()]
    return model + [
        'data.source=synthetic',
        'train.progress_bar=false',
        'train.image_every_steps=0',
        'train.log_every_steps=1',
        'train.save_every_steps=0',
        'train.keep_last=0',
        f'train.epochs={r["epochs"]}',
        f'train.warmup_epochs={r["warmup_epochs"]}',
        f'train.warmup_start_factor={r["warmup_start_factor"]}',
        'train.min_lr=0.0',
        f'train.base_lr={r["lr"] * 256 / r["batch"]!r}',  # the official lr is per run; ours is per 256 images
        f'train.weight_decay={r["weight_decay"]}',
        f'train.betas=[{r["betas"][0]},{r["betas"][1]}]',
        f'train.momentum_base={r["m_base"]}',
        f'train.momentum_end={r["m_end"]}',
        f'train.output_dir={tmp / "run"}',
    ]


def ds_config(tmp: Path, precision: str) -> str:
    if precision == 'fp32':
        return str(ROOT / 'ds_configs' / 'cpu_debug.json')
    ds = json.loads((ROOT / 'ds_configs' / 'cpu_debug.json').read_text())
    ds['bf16'] = {'enabled': True}
    path = tmp / 'cpu_debug_bf16.json'
    path.write_text(json.dumps(ds))
    return str(path)


def replay(fx: dict, tmp: Path, monkeypatch, precision: str = 'fp32', extra: tuple = ()) -> Replay:
    import cmae_ds.tasks.pretrain as pretrain

    cfg = load_config(None, overrides(fx, tmp) + list(extra))
    rec = Replay()
    start = official_start(fx)
    images = fx['images'].float()
    targets = fx['targets'].float() if 'targets' in fx else None
    masks = list(fx['masks'])
    original_update = CMAE.momentum_update

    def momentum_update(self, m, *a, **k):
        rec.momenta.append(float(m))
        return original_update(self, m, *a, **k)

    monkeypatch.setattr(pretrain, 'CMAE', lambda model_cfg: load_official_cmae(start, model_cfg))
    monkeypatch.setattr(pretrain, 'pretrain_loader', lambda *a: FixedLoader(images, targets, fx['run']['batch']))
    monkeypatch.setattr(CMAE, 'random_mask', lambda self, n, device, gen=None: masks.pop(0).to(device))
    monkeypatch.setattr(CMAE, 'momentum_update', momentum_update)

    def observer(step, engine, model):
        if step == 0:
            model.register_forward_hook(
                lambda _m, _a, out: rec.losses.append({k: float(out[k].detach()) for k in LOSS_KEYS if k in out})
            )
            inner = getattr(engine.optimizer, 'optimizer', engine.optimizer)
            inner.register_step_pre_hook(lambda opt, _a, _k: rec.lrs.append([g['lr'] for g in opt.param_groups]))

    with one_rank_group():
        result = pretrain.train(cfg, ds_config(tmp, precision), observer=_Keep(observer, rec))
    assert result.steps == len(fx['lr'])
    return rec


class _Keep:
    """The observer, and at the last step a copy of the weights and of Adam's moments by our parameter names."""

    def __init__(self, observer, rec: Replay):
        self.observer, self.rec = observer, rec

    def __call__(self, step, engine, model):
        self.observer(step, engine, model)
        self.rec.final = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        inner = getattr(engine.optimizer, 'optimizer', engine.optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        for group in inner.param_groups:
            for p in group['params']:
                state = inner.state.get(p)
                if state and id(p) in names:  # bf16: the optimizer steps flat fp32 masters; no moments by name
                    self.rec.exp_avg[names[id(p)]] = state['exp_avg'].detach().float().clone()
                    self.rec.exp_avg_sq[names[id(p)]] = state['exp_avg_sq'].detach().float().clone()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def official_as_ours(tensors: dict) -> dict:
    return convert_official_cmae(tensors)


def loss_gap(rep: Replay, fx: dict) -> float:
    names = {'loss': 'loss', 'loss_rec': 'loss_rc', 'loss_con': 'loss_ct'}
    if fx['mode'] == 'mae':
        names = {'loss': 'loss'}
    assert len(rep.losses) == len(fx['losses'])
    pairs = zip(rep.losses, fx['losses'])
    return max(abs(ours[a] - theirs[b]) / abs(theirs[b]) for ours, theirs in pairs for a, b in names.items())


def tensor_gaps(ours: dict, fx: dict, part: str) -> dict:
    """Per tensor whose official noise floor is calm: (our distance to the official, the floor)."""
    theirs = official_as_ours(fx[part])
    floors = official_as_ours(fx['noise_floor'][part])
    out = {}
    for name, ref in theirs.items():
        if not ref.is_floating_point() or floors[name] >= CALM:
            continue
        assert name in ours, f'{name} missing from our {part}'
        out[name] = (rel(ours[name], ref), floors[name])
    return out


def global_gap(ours: dict, fx: dict, part: str = 'final') -> float:
    """One relative distance over every calm tensor laid end to end: the measure for bf16, where a bias that
    started at zero makes any per-tensor relative distance large."""
    theirs = official_as_ours(fx[part])
    floors = official_as_ours(fx['noise_floor'][part])
    names = [n for n, t in theirs.items() if t.is_floating_point() and floors[n] < CALM]
    return rel(torch.cat([ours[n].reshape(-1) for n in names]), torch.cat([theirs[n].reshape(-1) for n in names]))


def loss_gaps(rep: Replay, fx: dict) -> list:
    """Per step, the relative distance of the total loss."""
    return [abs(a['loss'] - b['loss']) / abs(b['loss']) for a, b in zip(rep.losses, fx['losses'])]
