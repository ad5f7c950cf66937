"""What every launch script shares: the run options and how an ending maps to an exit code.

Exit codes: 0 done; 2 a user error (bad config, data or checkpoint; one line names it); 3 the loss became NaN or
inf; 75 preempted after writing a complete checkpoint: requeue the job with the same command and it resumes
(75 is EX_TEMPFAIL of sysexits.h, "try again later").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

EXIT_OK, EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3, 75


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """--trust-checkpoint: the opt-out of cmae_ds.modelfiles.safe_load's checks, off by default."""
    parser.add_argument(
        '--trust-checkpoint',
        '--trust_checkpoint',
        dest='trust_checkpoint',
        action='store_true',
        help='load checkpoint files that name code to run (refused by default, docs/reliability.md)',
    )


def add_run_arguments(parser: argparse.ArgumentParser, ds_help: str) -> None:
    """Options of a training run: the DeepSpeed JSON, resume, the launcher's --local_rank, overrides."""
    parser.add_argument('--deepspeed_config', '--ds_config', dest='ds_config', default=None, help=ds_help)
    parser.add_argument('--resume', default='auto', help="'auto' (newest complete checkpoint), 'none', or a tag")
    add_trust_argument(parser)
    parser.add_argument(
        '--take-over-lock',
        '--take_over_lock',
        dest='take_over_lock',
        action='store_true',
        help="take over the run folder's lock from a run that is gone (see docs/reliability.md)",
    )
    parser.add_argument('--local_rank', type=int, default=None, help='set by the DeepSpeed launcher')
    parser.add_argument('overrides', nargs='*', help='section.key=value')


def run_guarded(body: Callable[[], int]) -> int:
    """`body()`'s exit code, or the documented code of an ending that is not a bug, printed as one line."""
    import faulthandler

    from .engine.dist import shutdown_distributed
    from .errors import USER_ERRORS, NonFiniteLoss, Preempted

    # A rank killed by a fatal signal (a segfault, a C++ std::terminate) prints every thread's Python stack, not
    # only the launcher's 'return code = -6'.
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
    try:
        code = body()
    except USER_ERRORS as e:
        _say(f'error: {e}')
        return EXIT_USER_ERROR
    except NonFiniteLoss as e:
        _say(f'training stopped: {e}')
        return EXIT_NONFINITE
    except Preempted as e:
        _say(f'preempted: {e}')
        code = EXIT_PREEMPTED
    # every rank ends a finished or preempted run together (the stop is agreed at a step boundary)
    shutdown_distributed()
    return code


def _say(line: str) -> None:
    """One line on stderr in one write: every rank of a run says its ending into the same log at the same moment,
    and unbuffered (PYTHONUNBUFFERED=1, as the tests run the ranks) print() writes the text and its newline apart,
    so two ranks' lines ran together ('...itpreempted: ...')."""
    sys.stderr.write(line + '\n')
    sys.stderr.flush()


def exit_process(code: int) -> None:
    """End a training process without interpreter finalization, after the exit handlers (the process-group
    teardown among them) have run: gloo's worker threads could still release tensors during finalization, and the
    rank died of SIGABRT after a finished or preempted run (pytorch/pytorch#190489; seen in a CI-style run here
    even after the teardown). Everything a run writes is closed by then."""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of fine-tuning and linear probing."""
    parser.add_argument(
        '--config', default=None, help='YAML file or preset name (default: finetune_vit_base, or linprobe_vit_base)'
    )
    add_run_arguments(
        parser,
        'DeepSpeed JSON (default: ds_configs/zero1_bf16.json on GPUs (linear probe: '
        'linprobe_bf16.json), ds_configs/cpu_debug.json without a GPU)',
    )


def default_classifier_ds_config(task: str) -> str:
    import torch

    root = Path(__file__).resolve().parents[1] / 'ds_configs'
    if not torch.cuda.is_available():
        return str(root / 'cpu_debug.json')
    return str(root / ('linprobe_bf16.json' if task == 'linprobe' else 'zero1_bf16.json'))


def run_classifier(args, task: str) -> int:
    """Fine-tune (`task` 'finetune') or linearly probe ('linprobe') as the parsed `args` say; prints a summary."""
    from .config import load_task_config
    from .engine.dist import is_main_process
    from .tasks.finetune import train

    cfg = load_task_config(task, args.config or f'{task}_vit_base', args.overrides)
    result = train(
        cfg,
        args.ds_config or default_classifier_ds_config(task),
        resume=args.resume,
        trust_checkpoint=args.trust_checkpoint,
        take_over_lock=args.take_over_lock,
    )
    if is_main_process():
        print(f'done: {result.steps} steps' + (f', last loss {result.last_loss:.4f}' if result.last_loss else ''))
        if result.best_top1 >= 0:
            print(f'best top-1:  {result.best_top1:.2f}')
        print(f'best model:  {result.best_file or "none (no evaluation yet)"}')
        print(f'last model:  {result.last_file}')
        print(f'metrics:     {result.run_dir / "metrics.jsonl"}')
        print(f'tensorboard: tensorboard --logdir {result.run_dir / "tensorboard"}')
    return EXIT_OK
