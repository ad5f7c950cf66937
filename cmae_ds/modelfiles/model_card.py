"""The model card written beside every model file the project exports (README.md), so that a folder can be published
as it is: what the model is, what it was trained on and for how long, how well it did, and the command and config
that made it. Its facts are the model file's own description (cmae_ds/modelfiles/model_file.py); the training
facts ('run') travel inside the file from the end of pretraining into every export made from it."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import yaml

from ..storage.atomic_write import atomic_write_text

MARKER = '<!-- cmae_ds model card: {name} -->'

_TITLES = {
    'cmae_ds.model': 'CMAE pretrained model (online and target encoders, decoders, projectors)',
    'cmae_ds.encoder': 'CMAE pretrained ViT encoder',
    'cmae_ds.timm': 'CMAE pretrained ViT encoder in timm format',
    'cmae_ds.classifier': 'ViT classifier fine-tuned from CMAE',
}


def command_line() -> str:
    """The command that is running, as it was typed (near enough to be repeated)."""
    return ' '.join([Path(sys.executable).name, *sys.argv])


def run_facts(
    cfg_dict: dict, steps: int, epochs: float, final_loss: Optional[float], run_dir: Path, knn: Optional[dict]
) -> dict:
    """The training facts a pretraining or fine-tuning run puts into its model files (and so into its cards)."""
    data = cfg_dict.get('data', {})
    return {
        'data': {k: data[k] for k in ('source', 'root', 'annotations') if data.get(k) not in (None, '')},
        'steps': steps,
        'epochs': epochs,
        'final_loss': final_loss,
        'knn': knn,
        'run_dir': str(run_dir),
        'command': command_line(),
        'config': cfg_dict,
    }


def last_knn(run_dir: Path) -> Optional[dict]:
    """The last kNN monitor result of a run (knn.jsonl), if it logged any."""
    import json

    path = Path(run_dir) / 'knn.jsonl'
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def card_path(model_path: Path) -> Path:
    """README.md beside the model, unless that folder's README is someone else's (not a card) or another model's
    card: then <stem>.README.md."""
    readme = model_path.parent / 'README.md'
    if not readme.exists():
        return readme
    first = readme.read_text(errors='replace').split('\n', 1)[0]
    return readme if first == _marker(model_path.name) else model_path.with_name(model_path.stem + '.README.md')


def _marker(name: str) -> str:
    # an HTML comment ends at the first '--' of '-->' and the line at a line break: neither may come from the name
    return MARKER.format(name=_one_line(name).replace('--', '-\\-'))


def _one_line(text) -> str:
    """`text` on one line: line breaks and other control characters as their escapes (a metadata string may hold
    them, and a line break inside a list item or comment would let it write the card's next line)."""
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _code(text) -> str:
    """An inline code span that holds `text` whatever backticks it contains (CommonMark: a longer run of them)."""
    text = _one_line(text)
    ticks = '`' * (max(map(len, re.findall('`+', text)), default=0) + 1)
    pad = ' ' if text.startswith('`') or text.endswith('`') else ''
    return f'{ticks}{pad}{text}{pad}{ticks}'


def _fenced(info: str, lines: list[str]) -> list[str]:
    """A code block that no line of its content can close (CommonMark: a fence longer than any backtick run in
    it; the closing one must be at least as long)."""
    text = '\n'.join(lines)
    fence = '`' * max(3, max(map(len, re.findall('`+', text)), default=0) + 1)
    return [fence + info, text, fence]


def write_model_card(
    model_path: Path, description: dict, tensors: dict, *, made_by: Optional[str] = None, run_card: bool = False
) -> Path:
    """The card for the model file at `model_path` (its description and tensors as written). `run_card`: the run
    folder's own README.md, replaced whenever the run writes a model (the folder's best model is its subject)."""
    model_path = Path(model_path)
    text = render(model_path.name, description, tensors, made_by or command_line())
    return atomic_write_text(model_path.parent / 'README.md' if run_card else card_path(model_path), text)


def render(name: str, d: dict, tensors: dict, made_by: str) -> str:
    fmt = d.get('format', 'cmae_ds.model')
    cfg, run = d.get('model_config') or {}, d.get('run') or {}
    params = sum(t.numel() for t in tensors.values())
    lines = [_marker(name), f'# {_one_line(_TITLES.get(fmt, fmt))}', '', '## Model', '']
    lines.append(f'- file: {_code(name)} ({_file_kind(name)}, {len(tensors)} tensors, {params / 1e6:.2f} M values)')
    if cfg:
        lines.append(
            _one_line(
                f'- architecture: ViT {cfg.get("size")} ({cfg.get("mode", "cmae")}), {cfg.get("img_size")} px, '
                f'patch {cfg.get("patch_size")}, width {cfg.get("embed_dim")}, depth {cfg.get("depth")}, '
                f'{cfg.get("num_heads")} heads'
            )
        )
    if d.get('timm_model'):
        lines.append(f"- timm: {_code(d['timm_model'])} (global_pool='token', final norm)")
    if fmt == 'cmae_ds.classifier':
        lines += _classifier_lines(d)
    lines += ['', '## Training', ''] + _training_lines(run)
    lines += ['', '## How it was made', ''] + _fenced('', [made_by])
    if run.get('command') and run['command'] != made_by:
        lines += ['', 'from the model of the run made by', ''] + _fenced('', [run['command']])
    if run.get('config'):
        config = yaml.safe_dump(run['config'], sort_keys=False).rstrip()
        lines += ['', 'Config of that run:', ''] + _fenced('yaml', [config])
    lines += ['', '## Loading', ''] + _fenced('python', _loading(name, fmt, d)) + ['']
    return '\n'.join(lines)


def _file_kind(name: str) -> str:
    return 'safetensors, fp32' if name.endswith('.safetensors') else 'torch pickle, fp32'


def _classifier_lines(d: dict) -> list[str]:
    lines = [_one_line(f'- task: {d.get("kind")}, {d.get("num_classes")} classes at {d.get("img_size")} px')]
    metrics = d.get('metrics') or {}
    if metrics:
        lines.append(
            _one_line(
                f'- validation at epoch {d.get("epoch")}: top-1 {metrics.get("top1")}, top-5 {metrics.get("top5")}'
            )
        )
    if d.get('pretrained'):
        lines.append(f'- started from: {_code(d["pretrained"])}')
    return lines


def _training_lines(run: dict) -> list[str]:
    if not run:
        return ['- not recorded (made from a file that does not carry its training facts)']
    data = run.get('data') or {}
    source = ', '.join(f'{k} {v}' for k, v in data.items()) or 'not recorded'
    loss = run.get('final_loss')
    lines = [
        _one_line(f'- data: {source}'),
        _one_line(f'- steps: {run.get("steps")} optimizer steps ({_epochs(run.get("epochs"))} epochs)'),
        f'- final loss: {loss:.4f}' if isinstance(loss, (int, float)) else '- final loss: not logged',
    ]
    knn = run.get('knn')
    if knn:
        lines.append(
            _one_line(
                f'- kNN (k-NN monitor) at step {knn.get("step")}: top-1 {knn.get("top1")}, top-5 {knn.get("top5")}'
            )
        )
    else:
        lines.append('- kNN accuracy: not logged (knn monitor off)')
    if run.get('run_dir'):
        lines.append(f'- run folder: {_code(run["run_dir"])}')
    return lines


def _epochs(value) -> str:
    return f'{value:.3g}' if isinstance(value, (int, float)) else 'unknown'


def _loading(name: str, fmt: str, d: dict) -> list[str]:
    """Python that loads the file; every metadata string enters it as a literal (repr), and the command in its
    comments on one line, quoted for the shell."""
    file = repr(name)
    if fmt == 'cmae_ds.timm' and d.get('timm_model'):
        return [
            'import timm',
            f'model = timm.create_model({d["timm_model"]!r}, pretrained=True, num_classes=0,',
            f'                          pretrained_cfg_overlay=dict(file={file}))',
        ]
    if fmt == 'cmae_ds.timm':  # a size timm has no name for: its VisionTransformer with our arguments
        return [
            'from safetensors.torch import load_file',
            'from timm.models.vision_transformer import VisionTransformer',
            'from cmae_ds.config import ModelConfig',
            'from cmae_ds.modelfiles.formats import read_file, timm_kwargs',
            f"model = VisionTransformer(**timm_kwargs(ModelConfig(**read_file({file})['model_config'])))",
            f'model.load_state_dict(load_file({file}))',
        ]
    if fmt == 'cmae_ds.classifier':
        return [
            _one_line(f'# python launch/evaluate.py {shlex.quote(name)} val_data.root=...'),
            'from cmae_ds.modelfiles.classifier import load_classifier',
            f'model = load_classifier({file}).model',
        ]
    return [
        _one_line(f'# fine-tune: python launch/finetune.py {shlex.quote(f"finetune.pretrained={name}")} ...'),
        'from cmae_ds.config import ModelConfig',
        'from cmae_ds.modelfiles.formats import load_encoder, read_file',
        f'obj = read_file({file})',
        "encoder = load_encoder(obj, ModelConfig(**obj['model_config']))",
    ]
