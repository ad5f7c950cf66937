"""docs/cluster.md's files and scripts, beyond its launch commands (which tests/test_doc_commands.py checks): every
hostfile it writes parses with DeepSpeed's own hostfile reader, every `.deepspeed_env` with DeepSpeed's rules (one
`KEY=VALUE` a line, nothing else), the `CMAE_*` switches it names are read by the code, and the Slurm batch script
is valid bash."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / 'docs' / 'cluster.md'
HEREDOC = re.compile(r'^cat > (\S+) <<EOF\n(.*?)\nEOF$', re.M | re.S)


def fenced_blocks(path: Path) -> list[str]:
    return re.findall(r'^```\w*\n(.*?)^```$', path.read_text(), re.M | re.S)


def heredocs(name: str) -> list[str]:
    found = [body for block in fenced_blocks(CLUSTER) for target, body in HEREDOC.findall(block) if target == name]
    assert found, f'docs/cluster.md writes no {name}'
    return found


def test_hostfiles_parse_with_deepspeeds_reader():
    from deepspeed.launcher.runner import _parse_hostfile

    for body in heredocs('hosts'):
        pool = _parse_hostfile(body.splitlines())
        assert len(pool) == 4 and set(pool.values()) == {8}, pool


def test_deepspeed_env_has_only_key_value_lines():
    """DeepSpeed's runner splits every line of the file at its first '=': a blank line or a comment stops it."""
    for body in heredocs('.deepspeed_env'):
        for line in body.splitlines():
            assert re.fullmatch(r'[A-Z_][A-Z0-9_]*=\S+', line), f'.deepspeed_env line {line!r}'


def test_named_switches_exist():
    text = CLUSTER.read_text()
    named = set(re.findall(r'\bCMAE_[A-Z_]+\b', text)) - {'CMAE_FUSED_'}
    code = ''.join(p.read_text() for p in (ROOT / 'kernels').rglob('*.py'))
    code += ''.join(p.read_text() for p in (ROOT / 'cmae_ds').rglob('*.py') if 'kernels' not in p.parts)
    assert named and all(name in code for name in named), sorted(n for n in named if n not in code)


def test_batch_script_is_valid_bash(tmp_path):
    if not shutil.which('bash'):
        pytest.skip('no bash here')
    scripts = [block for block in fenced_blocks(CLUSTER) if block.startswith('#!/bin/bash')]
    assert scripts, 'docs/cluster.md has no batch script'
    for i, script in enumerate(scripts):
        path = tmp_path / f'job{i}.sbatch'
        path.write_text(script)
        check = subprocess.run(['bash', '-n', str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        assert '--signal=B:USR1@120' in script and 'scontrol requeue' in script and '-eq 75' in script
