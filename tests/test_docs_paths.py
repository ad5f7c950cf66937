"""The documentation gives paths a reader has (relative to the checkout, `../shared/...`, a variable such as
`$OFFBENCH`, a folder of their choosing), never the folders of the machine it was written on: its scratch and
temporary folders, home, or the checkout's own absolute location."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / 'README.md', *(ROOT / 'docs').glob('*.md'), *ROOT.glob('*/**/README.md')])
PAGES = [p for p in PAGES if not {'.git', '.pytest_cache', 'node_modules'} & set(p.relative_to(ROOT).parts)]
# Scratch roots (Linux's temporary folders, the root account's home, the usual scratch mounts) and where this
# checkout and its neighbours lie on the machine running the test.
MACHINE_ROOTS = [
    '/tmp/',
    '/var/tmp/',
    '/root/',
    '/scratch/',
    '/work/',
    f'{ROOT}/',
    f'{ROOT.parent}/',
    f'{Path.home()}/',
]
# A path starts after whitespace, a quote, a backtick, a parenthesis or '=' (PYTHONPATH=/x:/y also after ':').
START = r'(?:(?<=^)|(?<=[\s`\'"(=:,]))'


def machine_paths(text: str) -> list[str]:
    roots = sorted({r for r in MACHINE_ROOTS if r.strip('/')}, key=len, reverse=True)  # a home of '/' is none
    pattern = re.compile(START + '(' + '|'.join(re.escape(r) for r in roots) + r')[^\s`\'")\],;:]*', re.M)
    return [m.group(0) for m in pattern.finditer(text)]


def test_the_pattern_finds_machine_folders_and_leaves_readers_paths():
    text = (
        'Commands (`OFFBENCH=/work/offbench PY=/work/venv/bin/python`), PYTHONPATH=/work/wt/i21:$OFFBENCH/x\n'
        '/tmp/i23/budget/rollbacks.json and "$(mktemp -d)", ../shared/tools/x, $OFFBENCH/i21, runs/ft/model.pt,\n'
        'val_data.root=/data/imagenet/val, /dev/shm, https://example.org/tmp/x, RUN/checkpoints/step_00000004'
    )
    assert machine_paths(text) == [
        '/work/offbench',
        '/work/venv/bin/python',
        '/work/wt/i21',
        '/tmp/i23/budget/rollbacks.json',
    ]
    assert machine_paths(f'see {ROOT}/docs/x.md') == [f'{ROOT}/docs/x.md']


def test_pages_found():
    assert ROOT / 'README.md' in PAGES and ROOT / 'docs' / 'resume.md' in PAGES and len(PAGES) > 10


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_no_folder_of_one_machine(page: Path):
    found = machine_paths(page.read_text())
    assert not found, f'{page.relative_to(ROOT)} names folders of one machine: {found} (give a path a reader has)'
