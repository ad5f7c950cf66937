"""The CUDA defaults on the CPU: every task with model.compile=blocks (what `auto` means on CUDA) forced, compiled
by dynamo with the 'eager' backend (the same tracing, guards and recompiles as inductor, without generating code),
in this process on the real DeepSpeed engine (one rank, gloo). Each task changes mode in its run (training with
grad, evaluation or a kNN pass under no_grad, activation checkpointing's recompute), and each must end with its
blocks still compiled (no fall-back warning) and no more graphs per compiled region than the recompile limit that
engine/compile.py sets: a task past it would stop (fullgraph=True) or, now, fall back to eager.

The lane's runs are tiny (debug model, 2-4 steps); docs/testing.md ("The CUDA-defaults lane") says what else that
differs between the CPU and CUDA is forced here, and what cannot be.
"""

import logging
from pathlib import Path

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from cmae_ds.config import load_config
from cmae_ds.config.ds_config import validate
from cmae_ds.config.loading import load_task_config
from cmae_ds.engine.compile import VARIANTS_PER_SHAPE
from cmae_ds.engine.dist import setup_distributed
from cmae_ds.kernels import configure as configure_kernels
from cmae_ds.modelfiles.model_file import run_model_file
from cmae_ds.models.vit import Block
from cmae_ds.tasks import benchmark, finetune
from cmae_ds.tasks.knn import KnnMonitor
from cmae_ds.tasks.pretrain import train

from engine_helpers import write_ds
from finetune_helpers import write_class_folder
from run_recorder import ARGS, one_rank_group

pytestmark = pytest.mark.slow  # ~50 s in all (DeepSpeed engines in this process), the CI's lane, not the everyday one
DEFAULT_LIMIT = 8  # torch._dynamo.config.recompile_limit's default
PRESETS = Path(finetune.__file__).resolve().parents[1] / 'presets'
BLOCKS = ['model.compile=blocks']
TASK_SMALL = ['model.size=debug', 'model.img_size=32', 'model.patch_size=8', 'data.num_workers=0']
TASK_SMALL += ['val_data.num_workers=0']


@pytest.fixture(autouse=True)
def _compiled_on_the_cpu(monkeypatch, caplog):
    """The eager backend (CMAE_COMPILE_BACKEND, read by apply_compile); a fresh dynamo cache per task, so the graphs
    counted are that task's; the process-wide recompile limit put back afterwards."""
    monkeypatch.setenv('CMAE_COMPILE_BACKEND', 'eager')
    configure_kernels(off=('recon_loss', 'visible_embed', 'ema'), environment=False)  # interpreted Triton: slow
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        with caplog.at_level(logging.WARNING, logger='cmae_ds.engine.compile'):
            yield
    torch._dynamo.reset()
    configure_kernels()


def assert_compiled_within_the_limit(caplog, at_most: int = DEFAULT_LIMIT) -> int:
    """No fall-back (its one warning line), some graphs of Block.forward (the code every compiled block shares),
    and no more than `at_most`, itself within the limit. Returns the count. At most torch's default limit by
    default: graphs that grow with the number of blocks (a per-block constant read inside one) pass it at 12."""
    fell_back = [r.getMessage()[:300] for r in caplog.records if r.name == 'cmae_ds.engine.compile']
    assert not fell_back, fell_back
    graphs = len(_debug_get_cache_entry_list(Block.forward.__code__))
    assert 1 <= graphs <= at_most <= torch._dynamo.config.recompile_limit, (graphs, at_most)
    print(f'compiled graphs of Block.forward: {graphs}')
    return graphs


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('lane')
    return write_class_folder(root / 'train', [8, 8], size=(32, 32)), write_class_folder(root / 'val', [4, 4])


def _knn(train: Path, val: Path) -> list:
    args = ['knn.every_steps=2', 'knn.batch_size=8']
    for split, root in (('knn_train', train), ('knn_val', val)):
        args += [f'{split}.source=folder', f'{split}.root={root}', f'{split}.pipeline=torch', f'{split}.num_workers=0']
    return args


def _pretrain(tmp: Path, images: Path, *extra, observer=None):
    """A 2-step in-process pretraining run (bf16 ZeRO-1, one rank) with the lane's overrides; returns its result."""
    ds = write_ds(tmp, 'ds.json', zero_optimization={'stage': 1}, bf16={'enabled': True})
    args = [f'data.root={images}', f'train.output_dir={tmp}', *BLOCKS, 'train.epochs=1', 'train.max_steps=2', *extra]
    cfg = load_config(None, ARGS + args)
    monitor = observer(cfg) if observer else None
    return train(cfg, ds, observer=monitor), monitor


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, folders):
    """CMAE pretraining as a GPU runs it by default: blocks compiled, activation checkpointing, the kNN monitor (an
    encoder pass over every patch in eval mode under no_grad, after step 2). Returns (run folder, result, kNN
    results, graphs, the limit)."""
    tmp = tmp_path_factory.mktemp('pretrain')
    torch._dynamo.reset()

    def knn(cfg):
        return KnnMonitor(cfg.knn, cfg.knn_train, cfg.knn_val, cfg.model.img_size, run_dir=tmp)

    with one_rank_group():
        result, monitor = _pretrain(
            tmp, folders[0], 'model.activation_checkpointing=true', *_knn(*folders), observer=knn
        )
    graphs = len(_debug_get_cache_entry_list(Block.forward.__code__))
    return tmp, result, monitor.history, graphs, torch._dynamo.config.recompile_limit


def test_pretraining_with_checkpointing_and_the_knn_monitor(pretrained, caplog):
    run_dir, result, knn, graphs, limit = pretrained
    assert result.steps == 2 and run_model_file(run_dir).is_file()
    assert [step for step, _ in knn] == [2], knn
    # online encoder, decoder, target branch and the kNN pass: one block shape at debug size (its decoder has the
    # encoder's width), 8 graphs (the sequence lengths of the visible, full and decoder inputs, train and no_grad,
    # checkpointing's recompute): at torch's default limit of 8, one more variant would have stopped the run
    assert 1 <= graphs <= VARIANTS_PER_SHAPE <= limit, (graphs, limit)
    print(f'compiled graphs of Block.forward: {graphs}')


def test_mae_pretraining(tmp_path, folders, caplog):
    with one_rank_group():
        result, _ = _pretrain(tmp_path, folders[0], 'model.mode=mae')
    assert result.steps == 2
    assert_compiled_within_the_limit(caplog)


def _task(task: str, preset: str, overrides: list):
    return load_task_config(task, str(PRESETS / f'{preset}.yaml'), TASK_SMALL + BLOCKS + overrides)


def _data(folders, task: str) -> list:
    return [
        f'data.root={folders[0]}',
        f'val_data.root={folders[1]}',
        f'{task}.num_classes=2',
        f'{task}.progress_bar=false',
    ]


def test_finetuning_twelve_blocks_with_drop_path_and_its_evaluation(tmp_path, folders, pretrained, caplog):
    """From the lane's pretraining at depth 12 would need a depth-12 pretraining: from scratch here instead (the
    compiled blocks are the same); drop-path 0.1 gives each block its own rate, the case that once stopped every
    ViT-B/L fine-tuning at its first step. One epoch (2 steps) then the evaluation (eval mode, no_grad)."""
    cfg = _task(
        'finetune',
        'finetune_debug',
        _data(folders, 'finetune')
        + [
            'model.depth=12',
            'finetune.pretrained=none',
            'finetune.drop_path=0.1',
            'finetune.epochs=1',
            'finetune.warmup_epochs=0',
            f'finetune.output_dir={tmp_path / "ft"}',
        ],
    )
    with one_rank_group():
        result = finetune.train(cfg, write_ds(tmp_path, train_micro_batch_size_per_gpu=8))
    assert result.steps == 2 and len(result.evals) == 1
    assert_compiled_within_the_limit(caplog)


def test_linear_probing_from_the_pretraining(tmp_path, folders, pretrained, caplog):
    cfg = _task(
        'linprobe',
        'linprobe_vit_base',
        _data(folders, 'linprobe')
        + [
            f'linprobe.pretrained={pretrained[0]}',
            'linprobe.epochs=1',
            'linprobe.warmup_epochs=0',
            f'linprobe.output_dir={tmp_path / "lp"}',
        ],
    )
    with one_rank_group():
        result = finetune.train(cfg, write_ds(tmp_path, train_micro_batch_size_per_gpu=8))
    assert result.steps == 2 and len(result.evals) == 1
    assert_compiled_within_the_limit(caplog)


def test_the_benchmark_cell(tmp_path, caplog):
    cfg = load_config(
        None, ['model.size=debug', 'model.img_size=32', 'model.patch_size=8', 'model.decoder_depth=1', *BLOCKS]
    )
    ds = {
        'train_micro_batch_size_per_gpu': 2,
        'gradient_accumulation_steps': 1,
        'zero_optimization': {'stage': 1},
        'bf16': {'enabled': True},
        'steps_per_print': 10**9,
    }
    with one_rank_group():
        result = benchmark.run_cell('model', cfg, ds, 'ds.json', setup_distributed(), 1, 2)
    assert result.error is None and result.extra['compile'] == 'blocks' and 'compile_fallback' not in result.extra
    assert_compiled_within_the_limit(caplog)


def test_the_fine_tuning_engine_under_bf16_zero2(tmp_path, caplog):
    """The engine as a GPU builds it by default (bf16 through DeepSpeed, ZeRO-2): two micro-steps and an eval pass
    of the twelve-block classifier with drop-path."""
    cfg = _task(
        'finetune',
        'finetune_debug',
        [
            'model.depth=12',
            'finetune.pretrained=none',
            'finetune.num_classes=2',
            'finetune.drop_path=0.1',
            f'finetune.output_dir={tmp_path}',
        ],
    )
    ds = {
        'train_micro_batch_size_per_gpu': 2,
        'gradient_accumulation_steps': 1,
        'zero_optimization': {'stage': 2},
        'bf16': {'enabled': True},
        'steps_per_print': 10**9,
    }
    mixup, criterion = finetune.build_criterion(cfg)
    with one_rank_group():
        ctx = setup_distributed()
        engine, model, _ = finetune.build_engine(cfg, ds, validate(ds, None, ctx.world_size, path='ds'), ctx, 1e-3)
        batch = {'img': torch.randn(2, 3, 32, 32), 'label': torch.tensor([0, 1])}
        for _ in range(2):
            finetune.train_step(engine, batch, torch.bfloat16, mixup, criterion)
        engine.eval()
        with torch.no_grad():  # as run_evaluation: the input in the engine's dtype
            engine(batch['img'].to(torch.bfloat16))
    assert model.compiled.scope == 'blocks'
    assert_compiled_within_the_limit(caplog)
