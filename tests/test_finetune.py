"""End to end on the CPU: pretrain the debug model a few steps, fine-tune from its run folder (at another
resolution, with a stop and a resume), evaluate on 1 and 2 ranks, probe linearly; user errors exit 2."""

import json

import pytest
import torch

from cmae_ds.modelfiles.formats import read_file

from engine_helpers import run_deepspeed, run_python, tail, write_ds
from finetune_helpers import write_class_folder
from helpers import model_state

pytestmark = [pytest.mark.slow]

# The debug encoder of TINY, fine-tuned at 48 px (6x6 patches instead of 4x4: the position embedding is resized).
# finetune.seed=1: see the report on timm's RandAugment posterize with Pillow >= 11 (bits 0 raises).
FT = [
    'model.size=debug',
    'model.img_size=32',
    'model.patch_size=8',
    'finetune.img_size=48',
    'finetune.seed=1',
    'data.num_workers=0',
    'val_data.num_workers=0',
    'finetune.progress_bar=false',
]


@pytest.fixture(scope='module')
def setup(tmp_path_factory, pretrained_run):
    """Class folders, and the session's tiny pretraining run (tests/conftest.py) to start from."""
    root = tmp_path_factory.mktemp('ft')
    train = write_class_folder(root / 'train', [8, 8], seed=1)
    val = write_class_folder(root / 'val', [4, 3], seed=2)  # 7 images: not divisible by 2 ranks
    pre = pretrained_run['run']
    assert (pre / 'model.safetensors').is_file() and (pre / 'README.md').is_file()
    return dict(root=root, train=train, val=val, ds=write_ds(root), pre=pre)


def finetune(s, out, *extra, script='launch/finetune.py', config='finetune_debug', ds=None):
    return run_python(
        [
            script,
            '--config',
            config,
            '--deepspeed_config',
            ds or s['ds'],
            *FT,
            f'data.root={s["train"]}',
            f'val_data.root={s["val"]}',
            *extra,
        ]
    )


def metrics(run):
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


def test_finetune_resume_and_evaluate_on_one_and_two_ranks(setup):
    s, run = setup, setup['root'] / 'ft'
    args = [f'finetune.pretrained={s["pre"]}', f'finetune.output_dir={run}']
    first = finetune(s, run, *args, 'finetune.max_steps=3')  # 16 images / 4 = 4 steps per epoch, 2 epochs
    assert first.returncode == 0, tail(first)
    assert (run / 'checkpoints' / 'latest').read_text() == 'step_00000003'
    assert [m['step'] for m in metrics(run)] == [3]  # a run that stops mid-epoch is evaluated and saved
    second = finetune(s, run, *args)
    assert second.returncode == 0, tail(second)
    assert 'resumed from step_00000003' in second.stdout
    history = metrics(run)
    assert [(m['epoch'], m['step']) for m in history] == [(0, 3), (1, 4), (2, 8)]
    assert all(m['images'] == 7 for m in history)
    for name in ('model_best.safetensors', 'model_last.safetensors', 'README.md', 'config.yaml', 'ds_config.json'):
        assert (run / name).is_file(), name
    last = read_file(run / 'model_last.safetensors')
    assert (last['img_size'], last['num_classes'], last['step']) == (48, 2, 8)
    assert last['state_dict']['encoder.pos_embed'].shape == (1, 37, 64)
    best = max(history, key=lambda m: m['top1'])  # ties keep the earliest

    one = run_python(['launch/evaluate.py', str(run)])
    assert one.returncode == 0, tail(one)
    assert 'top-1' in one.stdout and 'top-5' in one.stdout
    r1 = json.loads((run / 'model_best.eval.json').read_text())
    assert (r1['images'], r1['img_size'], r1['world_size']) == (7, 48, 1)
    assert r1['top1'] == pytest.approx(best['top1']) and r1['loss'] == pytest.approx(best['loss'], rel=1e-5)

    two = run_deepspeed(
        ['launch/evaluate.py', str(run), '--batch_size', '3', '--predictions', '--out', str(s['root'] / 'eval2.json')]
    )
    assert two.returncode == 0, tail(two)
    r2 = json.loads((s['root'] / 'eval2.json').read_text())
    assert (r2['images'], r2['world_size']) == (7, 2)
    assert [p['index'] for p in r2['predictions']] == list(range(7))  # each image once, padding dropped
    assert r2['top1'] == pytest.approx(r1['top1']) and r2['loss'] == pytest.approx(r1['loss'], rel=1e-5)


def test_linear_probe_writes_an_evaluable_probe(setup):
    from cmae_ds.config import DataConfig
    from cmae_ds.data import build_classification_loader
    from cmae_ds.modelfiles.classifier import load_classifier
    from cmae_ds.tasks.evaluate import evaluate

    s, run = setup, setup['root'] / 'lp'
    proc = run_python(
        [
            'launch/linear_probe.py',
            '--config',
            'linprobe_vit_base',
            '--deepspeed_config',
            s['ds'],
            'model.size=debug',
            'model.img_size=32',
            'model.patch_size=8',
            'linprobe.num_classes=2',
            f'linprobe.pretrained={s["pre"] / "model.safetensors"}',
            'linprobe.epochs=1',
            'linprobe.warmup_epochs=0',
            'linprobe.seed=1',
            'linprobe.progress_bar=false',
            f'linprobe.output_dir={run}',
            f'data.root={s["train"]}',
            f'val_data.root={s["val"]}',
            'data.num_workers=0',
            'val_data.num_workers=0',
            'data.pipeline=torch',
            'val_data.pipeline=torch',
        ]
    )
    assert proc.returncode == 0, tail(proc)
    assert 'optimizer lars' in proc.stdout
    loaded = load_classifier(run)
    assert 'linprobe' in loaded.description and loaded.img_size == 32
    state = model_state(run / 'model_best.safetensors')
    pre = model_state(s['pre'] / 'model.safetensors')
    assert torch.equal(state['encoder.blocks.0.attn.qkv.weight'], pre['encoder.blocks.0.attn.qkv.weight'])  # frozen
    loader = build_classification_loader(
        DataConfig(source='folder', root=str(s['val']), pipeline='torch', num_workers=0),
        train=False,
        img_size=32,
        batch_size=4,
    )
    loader.set_epoch(0)
    result = evaluate(loaded.model.eval(), loader, torch.device('cpu'))
    assert result.images == 7 and result.top1 == pytest.approx(metrics(run)[-1]['top1'])


def test_user_errors_exit_2_without_traceback(setup):
    s = setup
    missing = s['root'] / 'missing.pt'
    proc = finetune(s, None, f'finetune.pretrained={missing}', f'finetune.output_dir={s["root"] / "m"}')
    assert proc.returncode == 2 and 'missing.pt: no such file' in proc.stderr and 'Traceback' not in proc.stderr, tail(
        proc
    )


@pytest.mark.parametrize('stage', [0, 2])
def test_bf16_finetune_and_linear_probe_on_one_process(setup, stage):
    """The single-GPU bf16 case (linprobe_bf16.json is ZeRO-0 bf16): the probe's BatchNorm and the classifier run
    next to DeepSpeed's bf16 weights and fp32 buffers."""
    s = setup
    ds = write_ds(s['root'], f'bf16_{stage}.json', bf16={'enabled': True}, zero_optimization={'stage': stage})
    ft = finetune(
        s,
        None,
        f'finetune.pretrained={s["pre"]}',
        f'finetune.output_dir={s["root"] / f"ft16_{stage}"}',
        'finetune.max_steps=2',
        ds=ds,
    )
    assert ft.returncode == 0, tail(ft)
    run = s['root'] / f'lp16_{stage}'
    lp = run_python(
        [
            'launch/linear_probe.py',
            '--config',
            'linprobe_vit_base',
            '--deepspeed_config',
            ds,
            'model.size=debug',
            'model.img_size=32',
            'model.patch_size=8',
            'linprobe.num_classes=2',
            f'linprobe.pretrained={s["pre"] / "model.safetensors"}',
            'linprobe.epochs=1',
            'linprobe.warmup_epochs=0',
            'linprobe.max_steps=2',
            'linprobe.progress_bar=false',
            f'linprobe.output_dir={run}',
            f'data.root={s["train"]}',
            f'val_data.root={s["val"]}',
            'data.num_workers=0',
            'val_data.num_workers=0',
            'data.pipeline=torch',
            'val_data.pipeline=torch',
        ]
    )
    if stage != 0:  # LARS is not a DeepSpeed-tested ZeRO optimizer: a user error before any engine is built
        assert lp.returncode == 2 and 'zero_allow_untested_optimizer' in lp.stderr and 'Traceback' not in lp.stderr
        return
    assert lp.returncode == 0, tail(lp)
    assert all(m['images'] == 7 for m in metrics(run))
