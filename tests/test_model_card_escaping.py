"""A model card holds metadata strings it did not write (file names, the timm name, data folders, the command line,
the config): a crafted one must stay data. The card is read by a CommonMark parser (markdown-it-py, the parser
family GitHub and the Hugging Face hub render with; https://spec.commonmark.org/0.31.2/#fenced-code-blocks: a fence
closes only on a backtick run at least as long as the opening one) and its Python by Python's own parser."""

from __future__ import annotations

import ast

import pytest
import torch

from cmae_ds.modelfiles.model_card import MARKER, render

markdown_it = pytest.importorskip('markdown_it')

EVIL = "x'\"```\n## Pwned\n```python\nimport os; os.system('id')  # `` ``` ```` -->\r.safetensors"
HEADINGS = ['Model', 'Training', 'How it was made', 'Loading']


def _card(fmt: str, **extra) -> str:
    run = {
        'data': {'source': 'folder', 'root': EVIL},
        'steps': 3,
        'epochs': 1.0,
        'final_loss': 0.5,
        'knn': None,
        'run_dir': EVIL,
        'command': f'python launch/pretrain.py {EVIL}',
        'config': {'data': {'root': EVIL}, 'note': '````\n```\n'},
    }
    d = {'format': fmt, 'model_config': {'size': EVIL}, 'run': run, 'pretrained': EVIL, **extra}
    return render(EVIL, d, {'w': torch.zeros(2)}, made_by=f'python launch/convert_checkpoint.py {EVIL}')


def _lines(text: str) -> str:
    """`text` with its line endings as CommonMark reads them (a lone carriage return ends a line too)."""
    return text.replace('\r\n', '\n').replace('\r', '\n')


def _python_literals(code: str) -> set:
    return {node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant)}


@pytest.mark.parametrize(
    'fmt,extra',
    [
        ('cmae_ds.model', {}),
        ('cmae_ds.classifier', {'kind': 'finetune', 'num_classes': 10, 'img_size': 32}),
        ('cmae_ds.timm', {'timm_model': EVIL}),
        ('cmae_ds.timm', {}),
    ],
    ids=['model', 'classifier', 'timm-named', 'timm-unnamed'],
)
def test_a_crafted_name_stays_inside_its_strings_and_blocks(fmt, extra):
    card = _card(fmt, **extra)
    tokens = markdown_it.MarkdownIt('commonmark').parse(card)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == 'heading_open' and t.tag == 'h2']
    assert headings == HEADINGS  # no heading written by the name
    fences = [t for t in tokens if t.type == 'fence']
    assert [t.info for t in fences] == ['', '', 'yaml', 'python']  # each block closed where the card closes it
    assert fences[0].content.rstrip('\n') == _lines(f'python launch/convert_checkpoint.py {EVIL}')
    assert fences[1].content.rstrip('\n') == _lines(f'python launch/pretrain.py {EVIL}')
    assert EVIL in _python_literals(fences[3].content)  # parses, and the name is a string in it, whole
    if extra.get('timm_model'):
        assert extra['timm_model'] in _python_literals(fences[3].content)
    first = card.split('\n', 1)[0]
    assert first.startswith(MARKER.format(name='')[:-4]) and first.endswith(' -->') and first.count('--') == 2


def test_the_yaml_config_reads_back_as_written():
    import yaml

    (block,) = [t for t in markdown_it.MarkdownIt('commonmark').parse(_card('cmae_ds.model')) if t.info == 'yaml']
    assert yaml.safe_load(block.content) == {'data': {'root': EVIL}, 'note': '````\n```\n'}


def test_ordinary_names_are_written_as_before():
    card = render('model.safetensors', {'format': 'cmae_ds.model'}, {'w': torch.zeros(2)}, made_by='python x.py')
    assert card.startswith('<!-- cmae_ds model card: model.safetensors -->\n')
    assert '- file: `model.safetensors` (safetensors' in card
    assert "obj = read_file('model.safetensors')" in card and '```python\n' in card
    assert '# fine-tune: python launch/finetune.py finetune.pretrained=model.safetensors ...' in card
