#!/usr/bin/env python
"""Throughput benchmark: images/s, step time, TFLOP/s, MFU and peak memory.

  python launch/benchmark.py --mode model model.size=vit_base                      # synthetic batches on the device
  python launch/benchmark.py --mode e2e --config cmae_vit_base_300e data.root=/data/imagenet/train
  python launch/benchmark.py --mode data data.source=folder data.root=...          # the pipeline alone
  deepspeed --num_gpus 8 launch/benchmark.py --mode model --sizes vit_base vit_large \\
      --deepspeed_config ds_configs/zero2_bf16.json ds_configs/zero3_bf16.json --micro 64 128   # a sweep
  python launch/benchmark.py --compare-fusion model.size=vit_base                  # fused paths on vs all off
  python launch/benchmark.py --compare-compile model.size=vit_base                 # eager vs compiled per block
  python launch/benchmark.py --guards both model.size=vit_base                     # the rollback guard on and off
  python launch/benchmark.py --compare-step-settings --mode e2e ...                # the step before and after issue 33

A sweep runs every (size, ds_config, micro-batch) cell, records a cell's failure (out of memory, ...) and goes on.
For a sweep the micro-batch of each cell replaces the JSON's train_micro_batch_size_per_gpu in a copy (the file on
disk is not touched). Results: a table on stdout and JSON at --out, rewritten after every cell.
"""

import argparse
import copy
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUSION_OFF = dict(fused=False, attention_backend='math', environment=False)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=['model', 'data', 'e2e'], default='model')
    p.add_argument('--config', default='debug', help='YAML file or preset name')
    p.add_argument(
        '--deepspeed_config',
        '--ds_config',
        dest='ds_configs',
        nargs='+',
        default=[str(ROOT / 'ds_configs' / 'cpu_debug.json')],
    )
    p.add_argument('--sizes', nargs='+', default=None, help="model sizes to sweep (default: the config's)")
    p.add_argument('--micro', nargs='+', type=int, default=None, help='micro-batch sizes to sweep')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps (optimizer steps; micro-batches in data mode)')
    p.add_argument('--steps', type=int, default=10, help='timed steps (optimizer steps; micro-batches in data mode)')
    p.add_argument('--peak-tflops', type=float, default=None, help='override the device peak used for MFU')
    p.add_argument(
        '--compare-fusion',
        action='store_true',
        help='run each cell with fused paths on, then with every fusion off (math attention, '
        'reference kernels, per-tensor EMA), and report the ratio',
    )
    p.add_argument(
        '--compare-compile',
        action='store_true',
        help='run each cell eager (model.compile=eager), then compiled per block (model.compile=blocks), and '
        'nothing else; report the ratio and the compile time',
    )
    p.add_argument(
        '--guards',
        choices=['on', 'off', 'both'],
        default='on',
        help='the rollback guard and stop agreement at every step as a run has them (on), the bare step (off), or '
        'each cell both ways with the ratio',
    )
    p.add_argument(
        '--compare-step-settings',
        action='store_true',
        help="each cell with the step's settings before issue 33 (DeepSpeed's bf16 overflow check and synchronized "
        'throughput timers on, the guard judging each step at once with a stop all-reduce of its own, the EMA from '
        'the bf16 weights), then as now; report the ratio',
    )
    p.add_argument('--out', default='benchmark.json')
    p.add_argument('--local_rank', type=int, default=None)
    p.add_argument('overrides', nargs='*')
    return p.parse_intermixed_args(argv)


def cells(args, base_cfg_overrides):
    from cmae_ds.config.ds_config import load_ds_config

    sizes = args.sizes or [None]
    for ds_path in args.ds_configs:
        ds_file = load_ds_config(ds_path)
        for size in sizes:
            for micro in args.micro or [None]:
                ds = copy.deepcopy(ds_file)
                if micro is not None:
                    ds['train_micro_batch_size_per_gpu'] = micro
                    ds.pop('train_batch_size', None)
                overrides = base_cfg_overrides + ([f'model.size={size}'] if size else [])
                yield Path(ds_path).name, ds, overrides


def run_one(args, ds_name, ds, overrides, ctx, guards=None, ema='auto'):
    from cmae_ds.config import load_config
    from cmae_ds.tasks.benchmark import BenchResult, run_cell

    cfg = load_config(args.config, overrides)
    try:
        guards = guards or ('on' if args.guards == 'both' else args.guards)
        return run_cell(args.mode, cfg, ds, ds_name, ctx, args.warmup, args.steps, args.peak_tflops, guards, ema)
    except Exception as e:  # a cell's failure (OOM above all) is a result; the sweep goes on
        if os.environ.get('CMAE_BENCH_DEBUG'):
            traceback.print_exc()
        _free_memory()
        r = BenchResult(
            args.mode,
            cfg.model.size,
            cfg.model.mode,
            ds_name,
            ds.get('train_micro_batch_size_per_gpu', 0),
            ctx.world_size,
            '-',
            -1,
            str(ctx.device),
        )
        r.error = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        return r


def _free_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_results(path, results) -> None:
    """Every finished cell so far, rewritten after each: a sweep stopped by its time limit (SIGTERM kills Python
    without running finally blocks) still leaves a complete JSON of what it measured, never a half-written one."""
    from cmae_ds.storage.atomic_write import atomic_write_text

    atomic_write_text(Path(path), json.dumps([r.to_dict() for r in results], indent=2))


def unfused(fn):
    """`fn()` with every fusion off: math attention, reference kernels, per-tensor EMA."""
    from cmae_ds.kernels import configured

    with configured(**FUSION_OFF):
        return fn()


def compiled_pair(args, ds_name, ds, overrides, ctx):
    """The cell eager and compiled per block; the compiled row carries speedup_vs_eager and compile_s, measured cold:
    dynamo's graphs of an earlier cell are dropped first (blocks of the same shape would reuse them; inductor's
    on-disk caches are the caller's to turn off, launch/gpu_checks.sh's compile_bl does)."""
    import torch

    eager = run_one(args, ds_name, ds, overrides + ['model.compile=eager'], ctx)
    torch._dynamo.reset()
    compiled = run_one(args, ds_name, ds, overrides + ['model.compile=blocks'], ctx)
    if eager.step_ms_median and compiled.step_ms_median:
        compiled.extra['speedup_vs_eager'] = eager.step_ms_median / compiled.step_ms_median
    return [eager, compiled]


def old_settings(ds: dict) -> dict:
    """The DeepSpeed JSON as ds_configs/ had it before issue 33: the bf16 overflow check and throughput timers on."""
    old = copy.deepcopy(ds)
    if old.get('bf16', {}).get('enabled'):
        old['bf16']['check_grad_overflow'] = True
    old['timers'] = {'throughput': {'enabled': True, 'synchronized': True}}
    return old


def step_settings_pair(args, ds_name, ds, overrides, ctx):
    """The cell with the step's settings before issue 33, then as now; the new row carries speedup_vs_old."""
    old = run_one(args, ds_name, old_settings(ds), overrides, ctx, guards='immediate', ema='bf16')
    old.extra['settings'] = 'before issue 33'
    new = run_one(args, ds_name, ds, overrides, ctx, guards='on')
    new.extra['settings'] = 'now'
    if old.step_ms_median and new.step_ms_median:
        new.extra['speedup_vs_old'] = old.step_ms_median / new.step_ms_median
    return [old, new]


def guards_pair(args, ds_name, ds, overrides, ctx, on):
    off = run_one(args, ds_name, ds, overrides, ctx, guards='off')
    if on.step_ms_median and off.step_ms_median:
        on.extra['guard_cost'] = on.step_ms_median / off.step_ms_median
    return off


def main(argv=None) -> int:
    args = parse(argv)
    from cmae_ds.engine.dist import setup_distributed
    from cmae_ds.errors import USER_ERRORS
    from cmae_ds.tasks.benchmark import format_table

    ctx = setup_distributed()
    results = []
    try:
        from cmae_ds.config import load_config
        from cmae_ds.kernels import configure

        configure(**load_config(args.config, args.overrides).kernels.switches())
        for ds_name, ds, overrides in cells(args, args.overrides):
            pair = None
            if args.compare_compile and args.mode != 'data':  # the pair alone: a cell before it would warm the cache
                pair = compiled_pair
            elif args.compare_step_settings and args.mode != 'data':
                pair = step_settings_pair
            if pair is not None:
                results.extend(pair(args, ds_name, ds, overrides, ctx))
                if ctx.is_main:
                    write_results(args.out, results)
                continue
            fused = run_one(args, ds_name, ds, overrides, ctx)
            results.append(fused)
            if args.guards == 'both' and args.mode != 'data':
                results.append(guards_pair(args, ds_name, ds, overrides, ctx, fused))
            if args.compare_fusion and args.mode != 'data':
                plain = unfused(lambda cell=(ds_name, ds, overrides): run_one(args, *cell, ctx))
                plain.extra['fusion'] = 'off'
                fused.extra['fusion'] = 'on'
                if plain.step_ms_median and fused.step_ms_median:
                    fused.extra['speedup_vs_unfused'] = plain.step_ms_median / fused.step_ms_median
                results.append(plain)
            if ctx.is_main:
                write_results(args.out, results)
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if ctx.is_main:
        print(format_table(results))
        for r in results:
            if 'speedup_vs_unfused' in r.extra:
                print(
                    f'{r.size} {r.ds_config} micro {r.micro_batch}: fused step is '
                    f'{r.extra["speedup_vs_unfused"]:.2f}x the unfused one (median step time ratio)'
                )
            if 'guard_cost' in r.extra:
                print(
                    f'{r.size} {r.ds_config} micro {r.micro_batch}: the step with the guards is '
                    f'{r.extra["guard_cost"]:.3f}x the step without (median step time ratio)'
                )
            if 'speedup_vs_old' in r.extra:
                print(
                    f'{r.size} {r.ds_config} micro {r.micro_batch}: the step as now is '
                    f'{r.extra["speedup_vs_old"]:.2f}x as fast as with the settings before issue 33 (median ratio)'
                )
            if 'speedup_vs_eager' in r.extra:
                print(
                    f'{r.size} {r.ds_config} micro {r.micro_batch}: compiled step is '
                    f'{r.extra["speedup_vs_eager"]:.2f}x the eager one after '
                    f'{r.extra.get("compile_s", 0):.0f} s of compiling '
                    f'{r.extra.get("compile_fallback", "")}'
                )
        write_results(args.out, results)
        print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
