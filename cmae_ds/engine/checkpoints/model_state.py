"""The full fp32 model out of a DeepSpeed engine, whatever its ZeRO stage, and the model file made from it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ...modelfiles.model_card import write_model_card
from ...modelfiles.model_file import MODEL_FORMAT, RUN_MODEL, write_model_file


def consolidated_state_dict(engine, model: torch.nn.Module, zero_stage: int) -> dict:
    """Full fp32 model state (online from the optimizer's fp32 masters where DeepSpeed has them, target as kept).
    Collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for p in model.parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            full = _gathered(p, zero_stage)
        state[names[id(p)]] = full.detach().float().cpu().clone()
    for name, value in model.state_dict().items():
        if name not in state:
            state[name] = value.detach().cpu().clone().float() if value.is_floating_point() else value.cpu()
    return state


def _gathered(p, zero_stage):
    if zero_stage != 3:
        return p
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.detach().clone()


def save_model_file(
    engine, model, zero_stage: int, run_dir: Path, is_main: bool, run: Optional[dict] = None
) -> Optional[Path]:
    """model.safetensors: the full fp32 model (online and target) for fine-tuning, extraction and export, with the
    run's training facts (`run`, see modelfiles/model_card.py) in its description and a model card beside it.
    Collective."""
    state = consolidated_state_dict(engine, model, zero_stage)
    if not is_main:
        return None
    description = {'format': MODEL_FORMAT, 'model_config': asdict(model.cfg), **({'run': run} if run else {})}
    path = write_model_file({'state_dict': state, **description}, run_dir / RUN_MODEL)
    write_model_card(path, description, state, run_card=True)
    return path
