"""How a config field declares its rules once: a numeric range or a set of choices in the field's metadata, checked
by `check_declared` for every section; and the type coercion of values read from YAML or the command line."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Optional


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


@dataclass(frozen=True)
class Range:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def holds(self, v: float) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def text(self) -> str:
        low = f'[{self.ge:g}' if self.ge is not None else f'({self.gt:g}' if self.gt is not None else '(-inf'
        high = f'{self.le:g}]' if self.le is not None else f'{self.lt:g})' if self.lt is not None else 'inf)'
        return f'{low}, {high}'


def ranged(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric field (or tuple of numbers) whose every value must lie in the range."""
    return field(default=default, metadata={'range': Range(ge, gt, le, lt)})


def choice(default: str, options: tuple):
    return field(default=default, metadata={'choices': tuple(options)})


def check_declared(obj, section: str) -> None:
    """Every declared range and choice of the dataclass instance `obj`; one error naming key, value and rule."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        rule = f.metadata.get('range')
        if rule is not None:
            values = value if isinstance(value, tuple) else (value,)
            if not all(rule.holds(v) for v in values):
                raise ConfigError(f'{section}.{f.name} {value!r} is out of range: must lie in {rule.text()}')
        options = f.metadata.get('choices')
        if options is not None and value not in options:
            raise ConfigError(f'{section}.{f.name} {value!r} must be one of {", ".join(map(repr, options))}')


def check_fields(cls, data: dict, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {unknown}; known keys: {sorted(known)}')


def coerce(cls, data: dict, where: str) -> dict:
    """Check each value against its field's type. YAML reads `1e30` as a string (1.1 wants `1.0e30`), so numeric
    strings become numbers; anything else of the wrong type is an error naming the key."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        kind = hints[key]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            if value is None:
                out[key] = None
                continue
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        out[key] = _coerce_value(kind, value, f'{where}.{key}')
    return out


def _coerce_value(kind, value, name: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind in (int, float):
        if isinstance(value, bool):
            pass
        elif isinstance(value, (int, float)) and (kind is float or float(value).is_integer()):
            return kind(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if kind is float or number.is_integer():
                    return kind(number)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(kind) is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(kind)):
            return tuple(_coerce_value(a, v, name) for a, v in zip(typing.get_args(kind), value))
    else:
        return value
    raise ConfigError(f'{name}: {value!r} is not a valid {getattr(kind, "__name__", kind)}')
