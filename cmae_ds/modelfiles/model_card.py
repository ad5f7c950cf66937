"""The model card written beside every model file the project exports (README.md), so that a folder can be published
as it is: what the model is, what it was trained on and for how long, how well it did, and the command and config
that made it. Its facts are the model file's own description (cmae_ds/modelfiles/model_file.py); the training
facts ('run') travel inside the file from the end of pretraining into every export made from it."""

from __future__ import annotations

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
    return (
        readme if first == MARKER.format(name=model_path.name) else model_path.with_name(model_path.stem + '.README.md')
    )


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
    lines = [MARKER.format(name=name), f'# {_TITLES.get(fmt, fmt)}', '', '## Model', '']
    lines.append(f'- file: `{name}` ({_file_kind(name)}, {len(tensors)} tensors, {params / 1e6:.2f} M values)')
    if cfg:
        lines.append(
            f'- architecture: ViT {cfg.get("size")} ({cfg.get("mode", "cmae")}), {cfg.get("img_size")} px, '
            f'patch {cfg.get("patch_size")}, width {cfg.get("embed_dim")}, depth {cfg.get("depth")}, '
            f'{cfg.get("num_heads")} heads'
        )
    if d.get('timm_model'):
        lines.append(f"- timm: `{d['timm_model']}` (global_pool='token', final norm)")
    if fmt == 'cmae_ds.classifier':
        lines += _classifier_lines(d)
    lines += ['', '## Training', ''] + _training_lines(run)
    lines += ['', '## How it was made', '', '```', made_by, '```']
    if run.get('command') and run['command'] != made_by:
        lines += ['', 'from the model of the run made by', '', '```', run['command'], '```']
    if run.get('config'):
        lines += ['', 'Config of that run:', '', '```yaml', yaml.safe_dump(run['config'], sort_keys=False).rstrip()]
        lines.append('```')
    lines += ['', '## Loading', '', '```python'] + _loading(name, fmt, d) + ['```', '']
    return '\n'.join(lines)


def _file_kind(name: str) -> str:
    return 'safetensors, fp32' if name.endswith('.safetensors') else 'torch pickle, fp32'


def _classifier_lines(d: dict) -> list[str]:
    lines = [f'- task: {d.get("kind")}, {d.get("num_classes")} classes at {d.get("img_size")} px']
    metrics = d.get('metrics') or {}
    if metrics:
        lines.append(
            f'- validation at epoch {d.get("epoch")}: top-1 {metrics.get("top1")}, top-5 {metrics.get("top5")}'
        )
    if d.get('pretrained'):
        lines.append(f'- started from: `{d["pretrained"]}`')
    return lines


def _training_lines(run: dict) -> list[str]:
    if not run:
        return ['- not recorded (made from a file that does not carry its training facts)']
    data = run.get('data') or {}
    source = ', '.join(f'{k} {v}' for k, v in data.items()) or 'not recorded'
    loss = run.get('final_loss')
    lines = [
        f'- data: {source}',
        f'- steps: {run.get("steps")} optimizer steps ({_epochs(run.get("epochs"))} epochs)',
        f'- final loss: {loss:.4f}' if isinstance(loss, (int, float)) else '- final loss: not logged',
    ]
    knn = run.get('knn')
    if knn:
        lines.append(
            f'- kNN (k-NN monitor) at step {knn.get("step")}: top-1 {knn.get("top1")}, top-5 {knn.get("top5")}'
        )
    else:
        lines.append('- kNN accuracy: not logged (knn monitor off)')
    if run.get('run_dir'):
        lines.append(f'- run folder: `{run["run_dir"]}`')
    return lines


def _epochs(value) -> str:
    return f'{value:.3g}' if isinstance(value, (int, float)) else 'unknown'


def _loading(name: str, fmt: str, d: dict) -> list[str]:
    if fmt == 'cmae_ds.timm' and d.get('timm_model'):
        return [
            'import timm',
            f"model = timm.create_model('{d['timm_model']}', pretrained=True, num_classes=0,",
            f"                          pretrained_cfg_overlay=dict(file='{name}'))",
        ]
    if fmt == 'cmae_ds.timm':  # a size timm has no name for: its VisionTransformer with our arguments
        return [
            'from safetensors.torch import load_file',
            'from timm.models.vision_transformer import VisionTransformer',
            'from cmae_ds.config import ModelConfig',
            'from cmae_ds.modelfiles.formats import read_file, timm_kwargs',
            f"model = VisionTransformer(**timm_kwargs(ModelConfig(**read_file('{name}')['model_config'])))",
            f"model.load_state_dict(load_file('{name}'))",
        ]
    if fmt == 'cmae_ds.classifier':
        return [
            '# python launch/evaluate.py ' + name + ' val_data.root=...',
            'from cmae_ds.modelfiles.classifier import load_classifier',
            f"model = load_classifier('{name}').model",
        ]
    return [
        f'# fine-tune: python launch/finetune.py finetune.pretrained={name} ...',
        'from cmae_ds.config import ModelConfig',
        'from cmae_ds.modelfiles.formats import load_encoder, read_file',
        f"obj = read_file('{name}')",
        "encoder = load_encoder(obj, ModelConfig(**obj['model_config']))",
    ]
