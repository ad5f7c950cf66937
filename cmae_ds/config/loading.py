"""Reading configs: YAML files or preset names, `section.key=value` overrides, and the sections built from them
(unknown sections and keys, wrong types and out-of-range values each name themselves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from .fields import ConfigError, check_fields, coerce
from .sections import SECTIONS, Config
from .tasks import TASKS, TaskConfig, task_sections

PRESET_DIR = Path(__file__).resolve().parents[1] / 'presets'


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str], sections: Optional[dict] = None) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw config dict."""
    sections = SECTIONS if sections is None else sections
    raw = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in raw.items()}
    for item in overrides:
        if '=' not in item or '.' not in item.split('=', 1)[0]:
            raise ConfigError(f'override {item!r} must look like section.key=value, e.g. train.epochs=800')
        key, value = item.split('=', 1)
        section, name = key.split('.', 1)
        if section not in sections:
            raise ConfigError(f'override {item!r}: unknown section {section!r}; sections: {list(sections)}')
        raw.setdefault(section, {})[name] = _parse_value(value)
    return raw


def build_sections(raw: dict, sections: dict, where: str) -> dict:
    """Each section's dataclass from the raw dict; unknown sections and keys and wrong types name themselves."""
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f'{where}: unknown section(s) {unknown}; sections: {list(sections)}')
    parts = {}
    for name, cls in sections.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f'{where}: section {name!r} must be a mapping')
        check_fields(cls, section, f'{where}: {name}')
        parts[name] = _build(cls, coerce(cls, section, name), name, where)
    return parts


def _build(cls, values: dict, name: str, where: str):
    """The dataclass; its errors name the section as the user wrote it (val_data, not data)."""
    try:
        return cls(**values)
    except ConfigError as e:
        own = getattr(cls, 'section', name)
        message = str(e)
        if own != name and message.startswith(f'{own}.'):
            message = f'{name}.{message[len(own) + 1 :]}'
        raise ConfigError(message) from None
    except TypeError as e:
        raise ConfigError(f'{where}: {name}: {e}') from None


def build_config(raw: dict, where: str = 'config') -> Config:
    return Config(**build_sections(raw, SECTIONS, where))


def read_yaml(path: str) -> tuple[dict, str]:
    """A YAML file, or a preset name from cmae_ds/presets -> (raw sections, where it came from)."""
    p = Path(path)
    if not p.exists() and (PRESET_DIR / f'{path}.yaml').exists():
        p = PRESET_DIR / f'{path}.yaml'
    if not p.exists():
        presets = sorted(q.stem for q in PRESET_DIR.glob('*.yaml'))
        raise ConfigError(f'config file {path} not found (presets: {presets})')
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'{p}: not valid YAML: {e}') from None
    if not isinstance(raw, dict):
        raise ConfigError(f'{p}: top level must be a mapping of sections')
    return raw, str(p)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML file (or a preset name from cmae_ds/presets) and apply command-line overrides."""
    raw, where = read_yaml(path) if path else ({}, 'defaults')
    return build_config(apply_overrides(raw, overrides or []), where)


def load_task_config(task: str, path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TaskConfig:
    """Load a fine-tuning ('finetune'), linear-probing ('linprobe') or kNN ('knn') YAML file or preset, then apply
    `section.key=value` overrides. Sections: model, data, val_data, kernels and the task's own."""
    if task not in TASKS:
        raise ConfigError(f'unknown task {task!r}; tasks: {list(TASKS)}')
    sections = task_sections(task)
    raw, where = read_yaml(path) if path else ({}, 'defaults')
    parts = build_sections(apply_overrides(raw, overrides or [], sections), sections, where)
    return TaskConfig(parts['model'], parts['data'], parts['val_data'], parts[task], parts['kernels'])
