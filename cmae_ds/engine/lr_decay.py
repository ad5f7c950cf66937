"""Layer-wise lr decay for fine-tuning (docs/spec.md section 9; MAE's `param_groups_lrd`, mmselfsup's
LearningRateDecayOptimWrapperConstructor): deeper layers keep more of the peak lr than the embeddings.

Layer ids over a ViTClassifier's parameter names: the patch embedding, cls token and position embedding are layer 0,
block i is layer i + 1, everything after the blocks (fc_norm, head) is layer depth + 1. The lr scale of layer l is
`layer_decay ** (depth + 1 - l)`, so the head trains at the full lr and the embeddings at layer_decay ** (depth + 1).
"""

from __future__ import annotations

from torch import nn

from .optim import no_weight_decay

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


def layer_scale(layer: int, depth: int, layer_decay: float) -> float:
    return layer_decay ** (depth + 1 - layer)


def layer_decay_groups(model: nn.Module, *, weight_decay: float, layer_decay: float, depth: int) -> list[dict]:
    """One group per (layer, decay or not) over the trainable parameters, each with 'lr_scale' (which
    engine.optim.set_lr multiplies in), 'weight_decay', 'layer_id' and 'names' (for inspection; build_optimizer
    strips them). No weight decay on 1-D parameters, biases, the cls token and the position embedding."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        decay = not no_weight_decay(name, param)
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
