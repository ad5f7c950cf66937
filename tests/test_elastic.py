"""Resume on another number of ranks or another ZeRO stage (cmae_ds/engine/checkpoints/elastic.py).

One chain of real DeepSpeed runs on the CPU (gloo), shared by every assertion (module-scoped): A trains 6 steps on
2 ranks with ZeRO-2 and saves every 2; B resumes A's step 2 on 1 rank with accumulation 2 (same global batch) and
takes 2 steps; C resumes B's step 4 on 2 ranks with ZeRO-3 and takes 2 steps. Right after each resume the state
must equal the saved one exactly (weights, target, buffers, Adam moments and step, group weight decay). Masks are
keyed by image content in these runs (tests/dist_scripts/elastic_probe.py).

The continuation tests compare the steps after a resume with an uninterrupted run on JPEGs (views keyed by image):
MAE from 2 ranks to 1 rank x accumulation 2 (CMAE's BatchNorm and InfoNCE span a micro-step across ranks, so only
MAE computes the same step on another split), CMAE from ZeRO-2 to ZeRO-3 (within bounds), and CMAE from ZeRO-3 to
ZeRO-3 (bit-identical). Every CMAE run here has the contrastive term on (InfoNCE, projector, predictor).
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cmae_ds.config import ConfigError, load_config
from cmae_ds.engine.checkpoints import elastic
from cmae_ds.engine.checkpoints.elastic import Layout, carry_position, check_model_config, needs_universal

from data_helpers import random_jpegs
from engine_helpers import TINY, run_deepspeed, run_python, tail, write_ds

ARGS = TINY + [
    'train.warmup_epochs=0',
    'train.base_lr=0.05',
    'train.momentum_base=0.9',
    'train.momentum_end=0.9',
    'train.save_every_steps=2',
    'train.keep_last=0',
]


def _ds(tmp, name, ranks, stage, accum, zero=None, ds=None):
    zero = {'stage': stage, **(zero or {})}
    return write_ds(tmp, name, zero_optimization=zero, gradient_accumulation_steps=accum, **(ds or {}))


def _run(tmp, name, ranks, stage, accum, run_dir, extra=(), record='', expect_ok=True, zero=None, ds=None):
    out = tmp / f'{name}.pt'
    proc = run_deepspeed(
        [
            'tests/dist_scripts/elastic_probe.py',
            '--deepspeed_config',
            _ds(tmp, f'{name}.json', ranks, stage, accum, zero, ds),
            '--out',
            str(out),
            '--record',
            record,
            *ARGS,
            f'train.output_dir={run_dir}',
            *extra,
        ],
        num_gpus=ranks,
    )
    assert proc.returncode == 0 or not expect_ok, tail(proc)
    return proc, (torch.load(out, weights_only=False) if proc.returncode == 0 else None)


def _copy_checkpoint(src_run: Path, tag: str, dst_run: Path) -> None:
    ckpt = dst_run / 'checkpoints'
    shutil.copytree(src_run / 'checkpoints' / tag, ckpt / tag)
    (ckpt / 'latest').write_text(tag)


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('elastic')
    runs = {}
    runs['A'] = _run(tmp, 'A', 2, 2, 1, tmp / 'A', ['train.max_steps=6'], record='2,4,6')
    _copy_checkpoint(tmp / 'A', 'step_00000002', tmp / 'B')
    runs['B'] = _run(tmp, 'B', 1, 2, 2, tmp / 'B', ['train.max_steps=2'], record='4')
    _copy_checkpoint(tmp / 'B', 'step_00000004', tmp / 'C')
    runs['C'] = _run(tmp, 'C', 2, 3, 1, tmp / 'C', ['train.max_steps=2'], record='6')
    return tmp, runs


def _assert_equal(resumed: dict, saved: dict) -> None:
    for part in ('online', 'exp_avg', 'exp_avg_sq', 'target', 'buffers'):
        for name, value in saved[part].items():
            assert torch.equal(resumed[part][name], value), f'{part} {name}'
    assert resumed['adam_step'] == saved['adam_step']
    assert [wd for _, wd in resumed['groups']] == [wd for _, wd in saved['groups']]


def _assert_compact(folder: Path) -> None:
    """Each parameter's file holds that tensor, not the whole flat buffer it is a view of (the target branch
    under CMAE's flat EMA), which made a ViT-B checkpoint's universal form 24x its size."""
    files = list((folder / 'zero').glob('target_encoder.*/fp32.pt'))
    assert files
    for f in files:
        tensor = torch.load(f, weights_only=False)['param']
        assert f.stat().st_size < tensor.numel() * tensor.element_size() + 4096, f


def test_conversion_saves_views_without_their_buffer(tmp_path):
    """What ds_to_universal writes per parameter (torch.save of a view of a flat buffer) holds that view only."""
    flat = torch.zeros(100_000)
    module = SimpleNamespace(torch=torch)
    with elastic._compact_saves(module):
        module.torch.save({'param': flat[:10]}, tmp_path / 'view.pt')
        assert module.torch.zeros(2).tolist() == [0.0, 0.0]  # everything else is torch's own
    assert module.torch is torch
    assert (tmp_path / 'view.pt').stat().st_size < 4096
    torch.save({'param': flat[:10]}, tmp_path / 'plain.pt')
    assert (tmp_path / 'plain.pt').stat().st_size > 400_000  # what it was before


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_to_one_with_accumulation_resumes_everything(chain):
    tmp, runs = chain
    (proc, b), (_, a) = runs['B'], runs['A']
    log = proc.stdout + proc.stderr
    assert 'written by 2 rank(s)' in log and 'resumed on 1 rank(s)' in log and 'global batch 8 ->' not in log
    assert (tmp / 'B' / 'checkpoints' / 'step_00000002' / 'universal' / 'source.json').is_file()
    assert (tmp / 'B' / 'checkpoints' / 'step_00000002' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt').is_file()
    assert b['start'] == 2
    _assert_compact(tmp / 'B' / 'checkpoints' / 'step_00000002' / 'universal')
    _assert_equal(b[2], a[2])
    assert a[2]['adam_step'] == [2.0]
    # CMAE on another split computes another step (see the MAE continuation test below): only the count here.
    assert b[4]['adam_step'] == [4.0]


@pytest.mark.slow
@pytest.mark.dist
def test_one_rank_to_two_and_zero2_to_zero3(chain):
    tmp, runs = chain
    (proc, c), (_, b) = runs['C'], runs['B']
    assert 'ZeRO-2 fp32, resumed on 2 rank(s)' in proc.stdout + proc.stderr
    _assert_equal(c[4], b[4])
    # rank 1 had no RNG file in a 1-rank checkpoint: reseeded, and its own file is written now
    assert (tmp / 'C' / 'checkpoints' / 'step_00000006' / 'rank_state_00001.pt').is_file()
    marker = json.loads((tmp / 'C' / 'checkpoints' / 'step_00000006' / 'complete.json').read_text())
    assert marker['layout'] == {
        'world_size': 2,
        'zero_stage': 3,
        'micro_batch': 4,
        'grad_accum': 1,
        'precision': 'fp32',
    }


@pytest.mark.slow
@pytest.mark.dist
def test_changed_global_batch_moves_to_the_first_step_boundary(chain):
    tmp, _ = chain
    _copy_checkpoint(tmp / 'A', 'step_00000002', tmp / 'E')
    proc, e = _run(tmp, 'E', 1, 2, 1, tmp / 'E', ['train.max_steps=1'])
    assert (
        'global batch 8 -> 4: resuming at image 16 of epoch 0 (the first unseen one); step 2 -> 4'
        in proc.stdout + proc.stderr
    )
    assert e['start'] == 4


@pytest.mark.slow
@pytest.mark.dist
def test_zero3_to_zero1_on_one_rank(tmp_path):
    """ZeRO-3 shards the weights too; its universal form loads on ZeRO-1 with nothing reset."""
    _, z3 = _run(tmp_path, 'Z3', 2, 3, 1, tmp_path / 'Z3', ['train.max_steps=2'], record='2')
    _copy_checkpoint(tmp_path / 'Z3', 'step_00000002', tmp_path / 'Z1')
    proc, z1 = _run(tmp_path, 'Z1', 1, 1, 2, tmp_path / 'Z1', ['train.max_steps=1'])
    assert 'ZeRO-3 fp32, resumed on 1 rank(s)' in proc.stdout + proc.stderr
    _assert_equal(z1[2], z3[2])


@pytest.mark.slow
@pytest.mark.dist
def test_zero2_on_two_ranks_to_zero3_with_optimizer_offload_on_one(chain, tmp_path):
    """The universal form loads into an optimizer offloaded to the CPU (DeepSpeed keeps its fp32 weights and
    moments there) with nothing reset."""
    tmp, runs = chain
    _copy_checkpoint(tmp / 'A', 'step_00000002', tmp_path / 'O')
    offload = {'offload_optimizer': {'device': 'cpu'}}
    proc, o = _run(tmp_path, 'O', 1, 3, 2, tmp_path / 'O', ['train.max_steps=1'], zero=offload)
    assert 'ZeRO-2 fp32, resumed on 1 rank(s)' in proc.stdout + proc.stderr
    _assert_equal(o[2], runs['A'][1][2])


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize('precision,stage', [('fp32', 3), ('bf16', 2)])
def test_zero0_moves_to_a_zero_stage_on_two_ranks_and_back(tmp_path, precision, stage):
    """ZeRO-0 on 1 rank x accumulation 2 -> ZeRO-`stage` on 2 ranks -> ZeRO-0 on 1 rank. DeepSpeed's universal
    format has no ZeRO-0 side: cmae_ds writes it from the ZeRO-0 checkpoint and reads it into the ZeRO-0 optimizer
    in each of its forms: fp32 steps the parameters themselves; bf16 with a non-fused optimizer an fp32 copy of
    each (the way there); bf16 with DeepSpeed's FusedAdam, as on a GPU, one flat fp32 tensor per group (the way
    back; its CPU op is built on first use). Everything is equal right after each move."""
    ds = {'bf16': {'enabled': True}} if precision == 'bf16' else {}
    fused = ['train.optimizer=deepspeed_fused'] if precision == 'bf16' else []
    _, z0 = _run(tmp_path, 'Z0', 1, 0, 2, tmp_path / 'Z0', ['train.max_steps=2'], record='2', ds=ds)
    assert z0[2]['adam_step'] == [2.0]  # bf16: none counted when DeepSpeed built the optimizer (optim.py)
    if precision == 'fp32':  # converted ahead of time here; the bf16 case converts on resume
        proc = run_python(['launch/convert_checkpoint.py', 'to-universal', str(tmp_path / 'Z0')])
        assert proc.returncode == 0 and 'step_00000002/universal' in proc.stdout, tail(proc)
    _copy_checkpoint(tmp_path / 'Z0', 'step_00000002', tmp_path / 'ZK')
    proc, zk = _run(tmp_path, 'ZK', 2, stage, 1, tmp_path / 'ZK', ['train.max_steps=2'], record='4', ds=ds)
    assert (
        f'ZeRO-0 {precision}, resumed on 2 rank(s) x micro 4 x accumulation 1 (global 8), ZeRO-{stage}' in proc.stdout
    )
    assert (tmp_path / 'ZK' / 'checkpoints' / 'step_00000002' / 'universal' / 'source.json').is_file()
    _assert_equal(zk[2], z0[2])
    _copy_checkpoint(tmp_path / 'ZK', 'step_00000004', tmp_path / 'Z0B')
    proc, back = _run(tmp_path, 'Z0B', 1, 0, 2, tmp_path / 'Z0B', ['train.max_steps=1', *fused], ds=ds)
    assert (
        f'ZeRO-{stage} {precision}, resumed on 1 rank(s) x micro 4 x accumulation 2 (global 8), ZeRO-0' in proc.stdout
    )
    _assert_equal(back[4], zk[4])
    assert zk[4]['adam_step'] == [s + 2 for s in z0[2]['adam_step']]
    if fused:  # the same ZeRO-0 layout and precision, another optimizer form: DeepSpeed's loader reads its own only
        _copy_checkpoint(tmp_path / 'Z0', 'step_00000002', tmp_path / 'ZF')
        proc, zf = _run(tmp_path, 'ZF', 1, 0, 2, tmp_path / 'ZF', ['train.max_steps=1', *fused], ds=ds)
        assert 'ZeRO-0 bf16 (optimizer form copies, here flat), resumed on' in proc.stdout
        _assert_equal(zf[2], z0[2])


@pytest.mark.slow
@pytest.mark.dist
def test_another_precision_goes_through_the_universal_form(chain, tmp_path):
    """DeepSpeed reopens its files only in the precision that wrote them (an fp32 ZeRO-0 checkpoint resumed in bf16
    ended in a KeyError inside its fp16 optimizer; ZeRO-2 looked for shards named after bf16): fp32 -> bf16 with
    the same ranks and stage, on ZeRO-2 and on ZeRO-0, goes through the universal form with nothing reset."""
    tmp, runs = chain
    bf16 = {'bf16': {'enabled': True}}
    _copy_checkpoint(tmp / 'A', 'step_00000002', tmp_path / 'P2')
    proc, p2 = _run(tmp_path, 'P2', 2, 2, 1, tmp_path / 'P2', ['train.max_steps=1'], ds=bf16)
    assert 'ZeRO-2 fp32, resumed on 2 rank(s) x micro 4 x accumulation 1 (global 8), ZeRO-2 bf16' in proc.stdout
    _assert_equal(p2[2], runs['A'][1][2])
    _, z0 = _run(tmp_path, 'Z0', 1, 0, 1, tmp_path / 'Z0', ['train.max_steps=2'], record='2')
    _copy_checkpoint(tmp_path / 'Z0', 'step_00000002', tmp_path / 'P0')
    proc, p0 = _run(tmp_path, 'P0', 1, 0, 1, tmp_path / 'P0', ['train.max_steps=1'], ds=bf16)
    assert 'ZeRO-0 fp32, resumed on 1 rank(s) x micro 4 x accumulation 1 (global 4), ZeRO-0 bf16' in proc.stdout
    _assert_equal(p0[2], z0[2])


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('jpegs')
    random_jpegs(root, 32, size=(40, 44))
    return root


def _continuation(tmp: Path, images: Path, mode: str, ranks: int, stage: int, accum: int, a_stage: int = 2):
    """A: 4 steps on 2 ranks with ZeRO-`a_stage`; B: A's step 2 resumed on (ranks, stage, accum) for 2 steps.
    JPEGs through the torch pipeline, whose view decisions are keyed by image, and masks keyed by image
    (elastic_probe.py): the same images see the same views and masks on any layout."""
    data = [f'model.mode={mode}', 'data.source=folder', f'data.root={images}', 'data.pipeline=torch']
    data += ['data.num_workers=0']
    _, a = _run(tmp, 'A', 2, a_stage, 1, tmp / 'A', ['train.max_steps=4', *data], record='2,4')
    _copy_checkpoint(tmp / 'A', 'step_00000002', tmp / 'B')
    _, b = _run(tmp, 'B', ranks, stage, accum, tmp / 'B', ['train.max_steps=2', *data], record='4')
    return a, b


# Biases whose output reaches a BatchNorm through linear maps and a token mean only (CMAE's contrastive branch):
# a shift common to every image, which the BatchNorm's batch mean removes.
BATCHNORM_FED = ('feature_decoder.norm.bias', 'feature_decoder.pred.bias', 'projector.fc0.bias', 'predictor.fc0.bias')


# The most one AdamW step moves an entry, in lr: |m_hat| / sqrt(v_hat) at the 3rd and 4th steps with betas
# (0.9, 0.95), by Cauchy-Schwarz over the gradients, is at most sqrt(sum_k a_k^2 / b_k) * sqrt(1 - b2^t) / (1 - b1^t)
# with a_k = 0.1 * 0.9^k and b_k = 0.05 * 0.95^k: 1.0009 (t = 3) and 1.0018 (t = 4), whatever the gradients.
ADAM_RATIO = 1.002


def _zero_gradient(name: str, t: torch.Tensor) -> torch.Tensor:
    """The entries whose true gradient is zero: the key third of an attention's qkv bias (softmax ignores a bias
    added to every key) and the BATCHNORM_FED biases. What they get is rounding noise, which Adam divides by its own
    tiny RMS into full lr steps of either sign: between summation orders two runs can move them apart by up to two lr
    steps a step (ADAM_RATIO), and nothing tighter holds."""
    if name in BATCHNORM_FED:
        return t.flatten()
    if not name.endswith('attn.qkv.bias'):
        return t.flatten()[:0]
    d = t.numel() // 3
    return t[d : 2 * d]


def _rest(name: str, t: torch.Tensor) -> torch.Tensor:
    if name in BATCHNORM_FED:
        return t.flatten()[:0]
    if not name.endswith('attn.qkv.bias'):
        return t.flatten()
    d = t.numel() // 3
    return torch.cat([t[:d], t[2 * d :]])


def _max(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _assert_continues(
    resumed: dict, straight: dict, before: dict, parts, label: str, bound: float = 1e-4, moment: float = 1e-5
) -> None:
    """After the resume, weights (and target) match the uninterrupted run to fp32 summation order: every tensor
    within `bound` of what the steps moved it, the zero-gradient entries within what Adam can move them apart in the
    two steps since the resume, and Adam's first moment (the averaged gradient) within `moment` of its largest
    entry. Measured 2026-12-03 (this 2-core CPU), CMAE ZeRO-2 -> ZeRO-3 with InfoNCE on: 1.3e-4 (a target norm
    weight), 3.0e-3 (the feature decoder's norm bias), 1.2e-5; on 2026-12-07, after the views' crop changed the
    images, 3.2e-3 there (the old bound, two lr steps, was 3.1e-3: a measured figure, not a limit)."""
    lr_steps = 4 * ADAM_RATIO * 0.05 * 8 / 256  # 2 steps x 2 runs moving apart, at the peak lr (base_lr x 8 / 256)
    report, noise, moments = {}, {}, {}
    for part in parts:
        for name, value in straight[part].items():
            diff, moved = resumed[part][name] - value, value - before[part][name]
            if _rest(name, diff).numel():
                report[f'{part} {name}'] = _max(_rest(name, diff)) / max(_max(_rest(name, moved)), 1e-12)
            if _zero_gradient(name, diff).numel():
                noise[f'{part} {name}'] = _max(_zero_gradient(name, diff))
    for name, m in straight['exp_avg'].items():
        if _rest(name, m).numel():
            moments[name] = _max(_rest(name, resumed['exp_avg'][name] - m)) / max(_max(_rest(name, m)), 1e-30)
    for table in (report, noise, moments):
        worst = sorted(table.items(), key=lambda kv: -kv[1])[:3]
        print(label, ', '.join(f'{k} {v:.2e}' for k, v in worst))
    assert all(rel < bound for rel in report.values()), (label, report)
    assert all(d < lr_steps for d in noise.values()), (label, noise)
    assert all(gap <= moment for gap in moments.values()), (label, moments)
    assert resumed['adam_step'] == straight['adam_step'], label  # a shared counter once advanced twice per step
    assert resumed['groups'] == straight['groups'], label  # each group's lr (the next step's) and weight decay


def _assert_identical(resumed: dict, straight: dict, parts, label: str) -> None:
    for part in (*parts, 'exp_avg', 'exp_avg_sq'):
        for name, value in straight[part].items():
            assert torch.equal(resumed[part][name], value), (label, part, name)
    assert resumed['groups'] == straight['groups'], label


@pytest.mark.slow
@pytest.mark.dist
def test_mae_on_two_ranks_continues_on_one_like_the_uninterrupted_run(tmp_path, images):
    """Same global batch split as 1 rank x 4 x accumulation 2 instead of 2 ranks x 4. MAE mode: CMAE's projector
    BatchNorm statistics and InfoNCE negatives span one micro-step across ranks, so another split of the same
    global batch computes another (equally valid) step, not the same one in another summation order."""
    a, b = _continuation(tmp_path, images, 'mae', 1, 2, 2)
    _assert_equal(b[2], a[2])
    _assert_continues(b[4], a[4], a[2], ('online',), 'MAE 2 ranks -> 1 rank x accumulation 2')
    assert b[4]['adam_step'] == [4.0]


@pytest.mark.slow
@pytest.mark.dist
def test_cmae_zero2_continues_on_zero3_like_the_uninterrupted_run(tmp_path, images):
    """Same ranks and micro-batches, ZeRO-2 -> ZeRO-3, InfoNCE on: the same CMAE steps in another summation order
    (ZeRO-2 and ZeRO-3 reduce the gradients in other buckets), online weights and target branch within bounds."""
    a, b = _continuation(tmp_path, images, 'cmae', 2, 3, 1)
    _assert_equal(b[2], a[2])
    _assert_continues(b[4], a[4], a[2], ('online', 'target'), 'CMAE ZeRO-2 -> ZeRO-3', bound=5e-4, moment=5e-5)


@pytest.mark.slow
@pytest.mark.dist
def test_zero3_resumed_on_zero3_continues_like_the_uninterrupted_run(tmp_path, images):
    """The plain resume, no conversion: DeepSpeed's prefetch trace must not be recorded from the state the load
    leaves (it failed the second step after the resume with a 'tracing error'). The same layout and summation
    order: two steps later everything (weights, target, both Adam moments, group lr) is bit-identical."""
    a, b = _continuation(tmp_path, images, 'cmae', 2, 3, 1, a_stage=3)
    _assert_equal(b[2], a[2])
    _assert_identical(b[4], a[4], ('online', 'target'), 'CMAE ZeRO-3 -> ZeRO-3')
    assert b[4]['adam_step'] == [4.0]


def _classify(tmp: Path, name: str, task: str, layout: tuple, run_dir: Path, images: Path, pretrained, *extra, ok=True):
    """A fine-tuning or probing run through launch/finetune.py (tests/dist_scripts/classifier_elastic_probe.py
    records its state at each save and right after a resume); layout = (ranks, stage, accum)."""
    ranks, stage, accum = layout
    out = tmp / f'{name}.pt'
    ds = {'zero_optimization': {'stage': stage}, 'gradient_accumulation_steps': accum}
    if task == 'linprobe' and stage:
        ds['zero_allow_untested_optimizer'] = True
    cmd = ['tests/dist_scripts/classifier_elastic_probe.py', f'--probe-out={out}']
    cmd += ['--linear-probe', '--config', 'linprobe_vit_base'] if task == 'linprobe' else ['--config', 'finetune_debug']
    cmd += ['--deepspeed_config', write_ds(tmp, f'{name}.json', **ds), 'model.size=debug', 'model.img_size=32']
    cmd += ['model.patch_size=8', f'{task}.pretrained={pretrained}', f'{task}.output_dir={run_dir}']
    for part in ('data', 'val_data'):
        cmd += [f'{part}.source=folder', f'{part}.root={images}', f'{part}.pipeline=torch', f'{part}.num_workers=0']
    cmd += [f'{task}.{k}' for k in ('progress_bar=false', 'epochs=4', 'warmup_epochs=1', 'num_classes=2')]
    cmd += [f'{task}.save_every_steps=2', f'{task}.keep_last=0', f'{task}.eval_every_epochs=0', *extra]
    proc = run_deepspeed(cmd, num_gpus=ranks)
    assert (proc.returncode == 0) == ok, tail(proc)
    return proc, (torch.load(out, weights_only=False) if ok else None)


def _assert_classifier_equal(resumed: dict, saved: dict) -> None:
    for part in ('weights', 'buffers'):
        assert resumed[part].keys() == saved[part].keys()
        for name, value in saved[part].items():
            assert torch.equal(resumed[part][name], value), f'{part} {name}'
    for name, states in saved['optim'].items():
        assert states and resumed['optim'][name].keys() == states.keys(), name
        for key, value in states.items():
            assert torch.equal(resumed['optim'][name][key], value), f'{name} {key}'
    assert resumed['groups'] == saved['groups'] and resumed['steps'] == saved['steps']


@pytest.mark.slow
@pytest.mark.dist
def test_finetuning_resumes_on_one_rank_and_probing_on_two(chain, tmp_path, images):
    """Fine-tuning (AdamW, layer-decay groups) from 2 ranks ZeRO-2 to 1 rank x accumulation 2 through the
    universal form; probing (LARS, the default ZeRO-0, whose files hold the whole optimizer state) from 1 rank x
    accumulation 2 to 2 ranks. Everything the optimizer holds is equal right after the resume."""
    pretrained = chain[0] / 'A'
    _, ft = _classify(tmp_path, 'FT', 'finetune', (2, 2, 1), tmp_path / 'FT', images, 'none', 'finetune.max_steps=2')
    _copy_checkpoint(tmp_path / 'FT', 'step_00000002', tmp_path / 'FT1')
    proc, ft1 = _classify(
        tmp_path, 'FT1', 'finetune', (1, 2, 2), tmp_path / 'FT1', images, 'none', 'finetune.max_steps=1'
    )
    assert 'resumed on 1 rank(s)' in proc.stdout + proc.stderr
    progress, state = ft1['resumed']
    assert progress['step'] == 2 and progress['batch_in_epoch'] == 4  # 16 images = 4 micro-batches of 4 on 1 rank
    _assert_classifier_equal(state, ft[2])

    _, lp = _classify(
        tmp_path, 'LP', 'linprobe', (1, 0, 2), tmp_path / 'LP', images, pretrained, 'linprobe.max_steps=2'
    )
    _copy_checkpoint(tmp_path / 'LP', 'step_00000002', tmp_path / 'LP2')
    _, lp2 = _classify(
        tmp_path, 'LP2', 'linprobe', (2, 0, 1), tmp_path / 'LP2', images, pretrained, 'linprobe.max_steps=1'
    )
    progress, state = lp2['resumed']
    assert progress['step'] == 2 and progress['batch_in_epoch'] == 2
    assert any('mu' in s for s in lp[2]['optim'].values())  # LARS momentum
    _assert_classifier_equal(state, lp[2])


@pytest.mark.slow
@pytest.mark.dist
def test_finetuning_moves_from_zero0_on_one_rank_to_zero2_on_two(tmp_path, images):
    """The ZeRO-0 side with fine-tuning's layer-decay groups (one per depth and decay, each named in the
    checkpoint): 1 rank x accumulation 2 on ZeRO-0 -> 2 ranks on ZeRO-2, everything equal right after."""
    _, ft = _classify(tmp_path, 'F0', 'finetune', (1, 0, 2), tmp_path / 'F0', images, 'none', 'finetune.max_steps=2')
    _copy_checkpoint(tmp_path / 'F0', 'step_00000002', tmp_path / 'F2')
    proc, f2 = _classify(tmp_path, 'F2', 'finetune', (2, 2, 1), tmp_path / 'F2', images, 'none', 'finetune.max_steps=1')
    assert 'ZeRO-0 fp32, resumed on 2 rank(s)' in proc.stdout
    progress, state = f2['resumed']
    assert progress['step'] == 2 and progress['batch_in_epoch'] == 2
    assert len(state['groups']) > 2  # layer decay: more than the decay / no-decay pair
    _assert_classifier_equal(state, ft[2])


@pytest.mark.slow
@pytest.mark.dist
def test_probe_under_zero_on_another_layout_is_refused_not_reset(chain, tmp_path, images):
    """The universal format has no slot for LARS momentum: moving a ZeRO-2 probe to 1 rank stops with one line
    instead of silently zeroing it."""
    pretrained, layout = chain[0] / 'A', (2, 2, 1)
    _classify(tmp_path, 'LZ', 'linprobe', layout, tmp_path / 'LZ', images, pretrained, 'linprobe.max_steps=2')
    _copy_checkpoint(tmp_path / 'LZ', 'step_00000002', tmp_path / 'LZ1')
    proc, _ = _classify(
        tmp_path, 'LZ1', 'linprobe', (1, 2, 2), tmp_path / 'LZ1', images, pretrained, 'linprobe.max_steps=1', ok=False
    )
    assert proc.returncode == 2
    assert 'resuming a LARS run on another layout is not supported' in proc.stderr
    assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_other_model_config_fails_with_one_line(chain):
    tmp, _ = chain
    _copy_checkpoint(tmp / 'A', 'step_00000002', tmp / 'F')
    proc = run_python(
        [
            'launch/pretrain.py',
            '--deepspeed_config',
            _ds(tmp, 'F.json', 1, 2, 2),
            *ARGS,
            'model.depth=3',
            f'train.output_dir={tmp / "F"}',
        ]
    )
    assert proc.returncode == 2, tail(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith('error:')]
    assert len(lines) == 1 and 'model.depth=2 there, 3 here' in lines[0], tail(proc)
    assert 'Traceback' not in proc.stderr


def test_position_in_images():
    two, one_acc2, one = Layout(2, 2, 4, 1), Layout(1, 2, 4, 2), Layout(1, 2, 4, 1)
    p = {'epoch': 3, 'batch_in_epoch': 5, 'step': 41, 'best_top1': 1.0}
    assert carry_position(p, two, one_acc2, steps_per_epoch=12) == ({**p, 'batch_in_epoch': 10}, None)
    # 40 images seen; global batch 12: the next step boundary is image 48 (8 images skipped this epoch)
    moved, note = carry_position(p, two, Layout(3, 2, 4, 1), steps_per_epoch=8)
    assert moved == {**p, 'epoch': 3, 'batch_in_epoch': 4, 'step': 3 * 8 + 4}
    assert '8 images of its order not trained on' in note
    moved, _ = carry_position({'epoch': 3, 'batch_in_epoch': 11, 'step': 47}, two, Layout(2, 2, 4, 4), 3)
    assert moved == {'epoch': 4, 'batch_in_epoch': 0, 'step': 12}  # 88 images: no whole step of 32 left
    assert carry_position(p, two, one, steps_per_epoch=25)[0]['step'] == 3 * 25 + 10


def test_what_needs_a_conversion():
    assert not needs_universal(Layout(2, 2, 4, 1), Layout(2, 2, 8, 1), 'x')
    assert not needs_universal(Layout(2, 0, 4, 1), Layout(4, 0, 4, 1), 'x')  # ZeRO-0: full state on every rank
    assert needs_universal(Layout(2, 2, 4, 1), Layout(1, 2, 4, 2), 'x')
    assert needs_universal(Layout(2, 3, 4, 1), Layout(2, 1, 4, 1), 'x')
    assert needs_universal(Layout(2, 0, 4, 1), Layout(1, 2, 4, 2), 'x')  # checkpoints/elastic_zero0.py: both ways
    assert needs_universal(Layout(2, 3, 4, 1), Layout(2, 0, 4, 1), 'x')
    assert needs_universal(Layout(2, 0, 4, 1, 'fp32'), Layout(2, 0, 4, 1, 'bf16'), 'x')  # another optimizer form
    assert not needs_universal(Layout(2, 2, 4, 1, None), Layout(2, 2, 4, 1, 'bf16'), 'x')  # unknown: as before


def test_model_mismatch_names_the_fields():
    cfg = load_config(None, ['model.size=debug']).model
    saved = {**json.loads(json.dumps(cfg.__dict__)), 'depth': 7, 'activation_checkpointing': True}
    with pytest.raises(ConfigError, match=r'model.depth=7 there, 2 here\)?') as e:
        check_model_config(saved, cfg, 'ckpt')
    assert 'activation_checkpointing' not in str(e.value)
