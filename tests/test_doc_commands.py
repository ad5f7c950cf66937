"""Every command line the documentation shows for a `launch/*.py` script parses with that script's own parser, and
its `section.key=value` overrides are fields of the config that script loads (no data is read, no model built).

Sources: README.md, docs/*.md, ds_configs/README.md (fenced blocks: every line; prose: inline code spans), the
module docstrings of launch/*.py and the comments of the presets (lines that start with python, deepspeed or
launch/, and inline code spans). A command is a logical line (backslash continuations joined, shell comments
dropped); what follows `launch/NAME.py` is the argv. Synopsis notation: `...` stands for elided arguments (kept as a
value: argparse takes it, an elided override value is a string), `[--opt value]` is optional (checked with it), and
`a|b|c` in one word is checked once per alternative. Under `deepspeed` the script also gets `--local_rank=0`, as
the DeepSpeed launcher passes it.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import io
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from cmae_ds.config import PRESET_DIR, ConfigError, load_config, load_task_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
SCRIPT = re.compile(r'^(?:\S*/)?launch/(\w+)\.py$')
LAUNCHER_START = re.compile(r'^(?:python3?|deepspeed|launch/)')
INLINE_CODE = re.compile(r'`([^`\n]+(?:\n[^`\n]+)?)`')
SHELL_SEPARATORS = {'&&', '||', '|', ';', '&'}
SHELLS = {'bash', 'sh'}
SHELL_VARIABLE = re.compile(r'^\$\{?\w+\}?$')
ELIDED = '...'

PARSER_OF: dict = {}  # script -> (the script whose parse() it uses, keyword arguments), where they differ


@dataclass
class Command:
    where: str  # file:line of the command's first line
    text: str
    script: str
    argv: list
    launcher: Optional[list] = None  # the `deepspeed` launcher's own arguments, when it starts the script


class CommandError(Exception):
    """The script's parser or config loader rejected the command; the message is theirs."""


# --- extraction ------------------------------------------------------------------------------------------------------


def logical_lines(lines: list[str], first: int) -> Iterator[tuple[int, str]]:
    """(line number, text) with backslash continuations joined."""
    buf, start = [], None
    for number, line in enumerate(lines, first):
        start = number if start is None else start
        if line.rstrip().endswith('\\'):
            buf.append(line.rstrip()[:-1])
            continue
        yield start, ' '.join(buf + [line])
        buf, start = [], None
    if buf:
        yield start, ' '.join(buf)


def commands_in(text: str, where: str, line: int, inline: bool = False) -> Iterator[Command]:
    """The launch/*.py invocations of one logical line. Inline spans without arguments name a script, not a command."""
    text = re.sub(r'\[(-[^\]]*)\]', r'\1', text)
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as e:
        if re.search(r'launch/\w+\.py', text):
            yield Command(f'{where}:{line}', text.strip(), '', [f'<unparsable shell line: {e}>'])
        return
    segments = [list(g) for sep, g in itertools.groupby(tokens, lambda t: t in SHELL_SEPARATORS) if not sep]
    for seg in segments:
        shell = next((i for i, t in enumerate(seg[:-2]) if t in SHELLS and seg[i + 1] == '-c'), None)
        if shell is not None:  # `bash -c "deepspeed ... launch/x.py ..."`, as srun lines in batch scripts have it
            yield from commands_in(seg[shell + 2], where, line, inline)
            continue
        hits = [i for i, t in enumerate(seg) if SCRIPT.match(t)]
        if not hits:
            continue
        i = hits[0]
        args = list(itertools.takewhile(lambda t: not re.match(r'^\d?[<>]', t), seg[i + 1 :]))
        if inline and not args:
            continue
        launcher = seg[seg.index('deepspeed') + 1 : i] if 'deepspeed' in seg[:i] else None
        if launcher is not None:
            args = ['--local_rank=0'] + args
        words = [t.split('|') if re.fullmatch(r'[\w.-]+(\|[\w.-]+)+', t) else [t] for t in args]
        for argv in itertools.product(*words):
            yield Command(f'{where}:{line}', ' '.join(seg), SCRIPT.match(seg[i]).group(1), list(argv), launcher)


def commands_in_prose(lines: list[str], where: str, first: int) -> Iterator[Command]:
    """Lines that start with a launcher are commands; elsewhere inline code spans (which may wrap a line)."""
    for number, text in logical_lines(lines, first):
        if LAUNCHER_START.match(text.strip()):
            yield from commands_in(text, where, number)
    joined = '\n'.join(lines)
    for m in INLINE_CODE.finditer(joined):
        if not LAUNCHER_START.match(joined[joined.rfind('\n', 0, m.start()) + 1 :].strip()):
            yield from commands_in(
                m.group(1).replace('\n', ' '), where, first + joined.count('\n', 0, m.start()), inline=True
            )


def markdown_commands(path: Path, where: Optional[str] = None) -> Iterator[Command]:
    where = where or str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    fence, block, start = False, [], 1
    for number, line in enumerate(lines + ['```'], 1):
        if not line.lstrip().startswith('```'):
            block.append(line)
            continue
        if fence:
            for n, text in logical_lines(block, start):
                yield from commands_in(text, where, n)
        else:
            yield from commands_in_prose(block, where, start)
        fence, block, start = not fence, [], number + 1


def docstring_commands(path: Path) -> Iterator[Command]:
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield from commands_in_prose(doc.splitlines(), str(path.relative_to(ROOT)), tree.body[0].lineno)


def comment_commands(path: Path) -> Iterator[Command]:
    lines = [line.lstrip()[1:] if line.lstrip().startswith('#') else '' for line in path.read_text().splitlines()]
    yield from commands_in_prose(lines, str(path.relative_to(ROOT)), 1)


def doc_sources() -> list[Path]:
    return [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md')), ROOT / 'ds_configs' / 'README.md']


def all_commands() -> list[Command]:
    found = [c for p in doc_sources() for c in markdown_commands(p)]
    found += [c for p in sorted(LAUNCH.glob('*.py')) for c in docstring_commands(p)]
    found += [c for p in sorted(PRESET_DIR.glob('*.yaml')) for c in comment_commands(p)]
    return found


# --- checking ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def launch_module(name: str):
    spec = importlib.util.spec_from_file_location(f'_doc_commands_{name}', LAUNCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(script: str, argv: list):
    name, kwargs = PARSER_OF.get(script, (script, {}))
    if not (LAUNCH / f'{name}.py').is_file():
        raise CommandError(f'launch/{script}.py does not exist')
    module = launch_module(name)
    if not hasattr(module, 'parse'):
        raise CommandError(f'launch/{name}.py has no parse(argv) to check its commands with')
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return module.parse(argv, **kwargs)
    except SystemExit as e:
        if e.code == 0:  # --help
            return None
        raise CommandError(err.getvalue().strip().splitlines()[-1].split(': error: ', 1)[-1]) from None


def known_config(path: Optional[str], default: Optional[str] = None) -> Optional[str]:
    """A config the repository holds (preset or file), else None: a user's own file, whose keys we cannot know, is
    replaced by the defaults, against which the overrides' keys are still checked."""
    if path is None:
        return default
    if (PRESET_DIR / f'{path}.yaml').is_file():
        return path
    return str(ROOT / path) if (ROOT / path).is_file() else None


def concrete(overrides: list) -> list:
    """Elided arguments dropped; an elided value stands for some string."""
    out = []
    for item in overrides:
        if item == ELIDED:
            continue
        key, sep, value = item.partition('=')
        out.append(f"{key}='{ELIDED}'" if sep and value == ELIDED else item)
    return out


def check_config(script: str, args) -> None:
    """Load the config the script would load, with the command's overrides (same functions as the scripts)."""
    overrides = concrete(getattr(args, 'overrides', None) or [])
    if script in ('pretrain', 'benchmark'):
        for size in getattr(args, 'sizes', None) or [None]:
            load_config(known_config(args.config), overrides + ([f'model.size={size}'] if size else []))
    elif script == 'convert_checkpoint':
        load_config(None, overrides)
    elif script in ('finetune', 'linear_probe'):
        task = 'linprobe' if script == 'linear_probe' or args.linear_probe else 'finetune'
        load_task_config(task, known_config(args.config, f'{task}_vit_base'), overrides)
    elif script == 'evaluate':
        path = known_config(args.config)  # without --config: the run folder's own config.yaml
        task = 'linprobe' if path and 'linprobe' in read_yaml(path)[0] else 'finetune'
        load_task_config(task, path, overrides)
    elif script == 'knn':
        load_task_config('knn', known_config(args.config), overrides)


def check_ds_configs(args) -> None:
    paths = getattr(args, 'ds_configs', None) or [getattr(args, 'ds_config', None)]
    for path in paths:
        if path and path.startswith('ds_configs/') and not (ROOT / path).is_file():
            raise CommandError(f'{path} is not in the repository')


@functools.lru_cache(maxsize=1)
def deepspeed_runner():
    from deepspeed.launcher import runner

    return runner


def check_launcher(launcher: Optional[list]) -> None:
    """The `deepspeed` launcher's own flags, against its own parser (a shell variable stands for some value)."""
    if not launcher:
        return
    argv = ['0' if SHELL_VARIABLE.match(t) else t for t in launcher] + ['script.py']
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            deepspeed_runner().parse_args(argv)
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1].split(': error: ', 1)[-1]
        raise CommandError(f'deepspeed {" ".join(launcher)}: {message}') from None


def problem(cmd: Command) -> Optional[str]:
    if not cmd.script:
        return f'{cmd.where}: {cmd.text}\n    {cmd.argv[0]}'
    try:
        check_launcher(cmd.launcher)
        args = parse(cmd.script, cmd.argv)
        if args is not None:
            check_config(cmd.script, args)
            check_ds_configs(args)
    except (CommandError, ConfigError) as e:
        return f'{cmd.where}: launch/{cmd.script}.py {" ".join(cmd.argv)}\n    {e}'
    return None


# --- tests ------------------------------------------------------------------------------------------------------------

COMMANDS = all_commands()


@pytest.mark.parametrize('cmd', COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses(cmd):
    found = problem(cmd)
    assert found is None, found


def test_every_source_and_script_is_covered():
    """The extraction itself: a change that made it find nothing would pass every case above."""
    sources = {c.where.rsplit(':', 1)[0] for c in COMMANDS}
    expected = {
        'README.md',
        'docs/finetune.md',
        'docs/data.md',
        'docs/benchmarks.md',
        'docs/cluster.md',
        'docs/pretrain.md',
        'docs/resume.md',
        'launch/pretrain.py',
        'launch/evaluate.py',
        'launch/knn.py',
        'launch/finetune.py',
        'launch/linear_probe.py',
        'launch/benchmark.py',
        'launch/make_annotations.py',
        'launch/scan_dataset.py',
    }
    assert expected <= sources, sorted(expected - sources)
    scripts = {c.script for c in COMMANDS}
    assert {p.stem for p in LAUNCH.glob('*.py')} <= scripts, sorted({p.stem for p in LAUNCH.glob('*.py')} - scripts)
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize(
    'line,message',
    [
        (
            'deepspeed --num_gpus 8 launch/evaluate.py ckpt.pth --no_such_flag 3',
            'unrecognized arguments: --no_such_flag',
        ),
        ('python launch/pretrain.py --config debug train.no_such_key=1', "unknown key(s) ['no_such_key']"),
        ('python launch/knn.py ckpt.pth knn.k=many', 'knn.k'),
        ('python launch/finetune.py --deepspeed_config ds_configs/missing.json', 'ds_configs/missing.json'),
        ('deepspeed --hostfile hosts --no_such_flag launch/pretrain.py', 'unrecognized arguments: --no_such_flag'),
        ('srun bash -c "deepspeed --master_port any launch/pretrain.py"', "--master_port: invalid int value: 'any'"),
    ],
)
def test_a_broken_command_is_reported_with_file_and_line(tmp_path, line, message):
    doc = tmp_path / 'broken.md'
    doc.write_text(f'# Title\n\nRun it:\n\n```bash\n{line}\n```\n')
    problems = [p for p in map(problem, markdown_commands(doc, 'docs/broken.md')) if p]
    assert len(problems) == 1 and problems[0].startswith('docs/broken.md:6: ') and message in problems[0], problems


def test_notation_continuations_alternatives_and_optional_groups(tmp_path):
    doc = tmp_path / 'README.md'
    doc.write_text(
        'Use `launch/benchmark.py --mode model|data` or\n`python launch/make_annotations.py ROOT OUT.json\n'
        '[--prefix train]`.\n\n```\ndeepspeed --num_gpus 2 launch/pretrain.py \\\n'
        '    train.epochs=2  # a comment\n'
        'srun bash -c "exec deepspeed --no_ssh --node_rank \\$SLURM_NODEID launch/pretrain.py train.epochs=3" &\n```\n'
    )
    found = [(c.where, c.script, c.argv, c.launcher) for c in markdown_commands(doc, 'README.md')]
    assert found == [
        ('README.md:1', 'benchmark', ['--mode', 'model'], None),
        ('README.md:1', 'benchmark', ['--mode', 'data'], None),
        ('README.md:2', 'make_annotations', ['ROOT', 'OUT.json', '--prefix', 'train'], None),
        ('README.md:6', 'pretrain', ['--local_rank=0', 'train.epochs=2'], ['--num_gpus', '2']),
        ('README.md:8', 'pretrain', ['--local_rank=0', 'train.epochs=3'], ['--no_ssh', '--node_rank', '$SLURM_NODEID']),
    ]


@pytest.mark.parametrize(
    'script,first',
    [('pretrain', []), ('finetune', []), ('benchmark', []), ('evaluate', ['ckpt.pth']), ('knn', ['ckpt.pth'])],
)
def test_overrides_may_come_before_and_after_options(script, first):
    args = parse(script, [*first, 'model.size=debug', '--config', 'debug', 'model.img_size=96'])
    assert args.config == 'debug' and args.overrides == ['model.size=debug', 'model.img_size=96']
