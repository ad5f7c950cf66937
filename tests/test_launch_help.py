"""Every `launch/*.py --help` says in one line what the script does and shows an example command of that script,
which parses with the script's own parser and config (the checks of tests/test_doc_commands.py)."""

import contextlib
import io
import re

import pytest
from test_doc_commands import LAUNCH, commands_in_prose, launch_module, problem

from cmae_ds.modelfiles.classifier import BEST, LAST, OLD_BEST, OLD_LAST

SCRIPTS = sorted(p.stem for p in LAUNCH.glob('*.py'))


def help_text(script: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        launch_module(script).parse(['--help'])
    assert exit_.value.code == 0
    return out.getvalue()


def description(text: str) -> list[str]:
    """The lines between the usage block and the argument lists."""
    body = text.split('\n\n', 1)[1]
    return re.split(r'^(?:positional arguments|options|optional arguments):$', body, flags=re.M)[0].splitlines()


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_says_what_and_shows_an_example(script):
    lines = description(help_text(script))
    first = lines[0]
    assert re.fullmatch(r'[A-Za-z`].{15,118}\.', first), f'launch/{script}.py --help begins {first!r}'
    examples = [c for c in commands_in_prose(lines, f'launch/{script}.py --help', 1) if c.script == script]
    assert examples, f'launch/{script}.py --help shows no example command'
    assert all(problem(c) is None for c in examples), [problem(c) for c in examples]


def test_every_script_is_covered():
    assert len(SCRIPTS) >= 10 and {'pretrain', 'scan_dataset', 'convert_checkpoint'} <= set(SCRIPTS)


@pytest.mark.parametrize('script', ['finetune', 'linear_probe', 'evaluate'])
def test_classifier_help_names_the_files_a_run_folder_holds(script):
    """The names fine-tuning writes (tasks/finetune.py saves BEST and LAST) and evaluation looks for in a run
    folder; the pickled names only as the older form."""
    text = ' '.join(help_text(script).split())
    assert BEST in text and LAST in text, f'launch/{script}.py --help does not name {BEST} and {LAST}'
    assert OLD_LAST not in text and (OLD_BEST not in text or f'{OLD_BEST} in a run from before safetensors' in text)
