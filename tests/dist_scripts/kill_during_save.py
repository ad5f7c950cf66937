"""launch/pretrain.py with a fault injected: the process is SIGKILLed while saving the tag given as the first
argument, after every rank's files are on disk and before the checkpoint is marked complete."""

import os
import runpy
import signal
import sys
from pathlib import Path

from cmae_ds.engine.checkpoints import store as checkpointing

doomed = sys.argv.pop(1)
mark_complete = checkpointing.mark_complete


def killing_mark_complete(ckpt_dir, tag, *args, **kwargs):
    if tag == doomed:
        os.kill(os.getpid(), signal.SIGKILL)
    mark_complete(ckpt_dir, tag, *args, **kwargs)


checkpointing.mark_complete = killing_mark_complete
script = Path(__file__).resolve().parents[2] / 'launch' / 'pretrain.py'
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name='__main__')
