"""Layer-wise lr decay for fine-tuning (docs/spec.md section 9), the groups the official
LearningRateDecayOptimWrapperConstructor (cmae/core/optimizer/layer_decay_optim_wrapper_constructor.py) builds.

Layer ids over a ViTClassifier's parameter names: the patch embedding, cls token and position embedding are layer 0,
block i is layer i + 1, everything after the blocks (fc_norm, head) is layer depth + 1. The lr scale of layer l is
`layer_decay ** (depth + 1 - l)`, so the head trains at the full lr and the embeddings at layer_decay ** (depth + 1).

Weight decay follows the official fine-tuning config's `paramwise_cfg`, not a rule on shapes: none where the
parameter's official name contains `.ln`, `.bias`, `.cls_token` or `.pos_embed` (substrings). So the blocks'
LayerNorm weights are exempt (official `layers.i.ln1`), and fc_norm's weight is decayed (official `backbone.fc_norm`).
"""

from __future__ import annotations

import re

from torch import nn

OFFICIAL_NO_DECAY_KEYS = ('.ln', '.bias', '.cls_token', '.pos_embed')

# Our classifier's names -> the official Classification model's (the inverse of
# modelfiles.formats.convert_official_classifier); the first matching rule applies.
_TO_OFFICIAL = [
    (re.compile(r'^fc_norm\.'), 'backbone.fc_norm.'),
    (re.compile(r'^head\.'), 'head.head.'),
    (re.compile(r'^encoder\.patch_embed\.proj\.'), 'backbone.patch_embed.projection.'),
    (re.compile(r'^encoder\.blocks\.(\d+)\.norm1\.'), r'backbone.layers.\1.ln1.'),
    (re.compile(r'^encoder\.blocks\.(\d+)\.norm2\.'), r'backbone.layers.\1.ln2.'),
    (re.compile(r'^encoder\.blocks\.(\d+)\.mlp\.fc1\.'), r'backbone.layers.\1.ffn.layers.0.0.'),
    (re.compile(r'^encoder\.blocks\.(\d+)\.mlp\.fc2\.'), r'backbone.layers.\1.ffn.layers.1.'),
    (re.compile(r'^encoder\.blocks\.(\d+)\.'), r'backbone.layers.\1.'),
    (re.compile(r'^encoder\.norm\.'), 'backbone.ln1.'),
    (re.compile(r'^encoder\.'), 'backbone.'),
]

_EMBEDDING_NAMES = ('cls_token', 'pos_embed', 'mask_token')


def layer_id(name: str, depth: int) -> int:
    """Layer id of a parameter of ViTClassifier (names `encoder.*`, `fc_norm.*`, `head.*`) or a bare encoder."""
    parts = name.split('.')
    if parts[0] == 'encoder':
        parts = parts[1:]
    if parts[0] == 'patch_embed' or parts[0] in _EMBEDDING_NAMES:
        return 0
    if parts[0] == 'blocks':
        return int(parts[1]) + 1
    return depth + 1


def official_name(name: str) -> str:
    """The official classifier's name of one of our ViTClassifier's parameters (or a bare encoder's)."""
    if not name.startswith(('encoder.', 'fc_norm.', 'head.')):
        name = 'encoder.' + name
    for pattern, repl in _TO_OFFICIAL:
        if pattern.search(name):
            return pattern.sub(repl, name, count=1)
    return name


def official_no_decay(name: str) -> bool:
    """The official fine-tuning config's rule: no weight decay where the official name contains one of the keys."""
    official = official_name(name)
    return any(key in official for key in OFFICIAL_NO_DECAY_KEYS)


def layer_scale(layer: int, depth: int, layer_decay: float) -> float:
    return layer_decay ** (depth + 1 - layer)


def layer_decay_groups(model: nn.Module, *, weight_decay: float, layer_decay: float, depth: int) -> list[dict]:
    """One group per (layer, decay or not) over the trainable parameters, each with 'lr_scale' (which
    engine.optim.set_lr reads), 'weight_decay', 'layer_id' and 'names' (for inspection; build_optimizer strips them).
    Weight decay as the official config's keys (official_no_decay)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        decay = not official_no_decay(name)
        group = groups.setdefault(
            (layer, decay),
            {
                'params': [],
                'names': [],
                'weight_decay': weight_decay if decay else 0.0,
                'lr_scale': layer_scale(layer, depth, layer_decay),
                'layer_id': layer,
            },
        )
        group['params'].append(param)
        group['names'].append(name)
    return [groups[key] for key in sorted(groups)]
