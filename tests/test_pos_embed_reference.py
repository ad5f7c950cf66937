"""Position-embedding interpolation (cmae_ds/models/vit.py) against the references: timm's resample_abs_pos_embed
and MAE's util/pos_embed.py interpolate_pos_embed, element for element, on an embedding with no symmetry (random),
so that a row/column swap or a transposed grid cannot pass."""

import pytest
import torch
import torch.nn.functional as F

from cmae_ds.models import interpolate_pos_embed


def mae_reference(pos_embed: torch.Tensor, new_size: int) -> torch.Tensor:
    """MAE's util/pos_embed.py interpolate_pos_embed, the checkpoint-dict plumbing left out."""
    embedding_size = pos_embed.shape[-1]
    num_extra_tokens = 1
    orig_size = int((pos_embed.shape[-2] - num_extra_tokens) ** 0.5)
    extra_tokens = pos_embed[:, :num_extra_tokens]
    pos_tokens = pos_embed[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode='bicubic', align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


@pytest.mark.parametrize('old,new', [(14, 24), (14, 7), (4, 6)])
def test_interpolation_equals_mae_and_timm_exactly(old, new):
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + old * old, 32, generator=torch.Generator().manual_seed(old * 100 + new))
    ours = interpolate_pos_embed(pos, new)
    assert ours.shape == (1, 1 + new * new, 32)
    assert torch.equal(ours, mae_reference(pos, new))
    # timm anti-aliases by default when it shrinks; MAE's (and ours) does not
    assert torch.equal(ours, resample_abs_pos_embed(pos, [new, new], num_prefix_tokens=1, antialias=False))


def test_a_row_column_swap_is_told_apart():
    pos = torch.randn(1, 1 + 14 * 14, 32, generator=torch.Generator().manual_seed(0))
    grid = pos[:, 1:].reshape(1, 14, 14, 32).transpose(1, 2).reshape(1, 196, 32)
    swapped = torch.cat([pos[:, :1], grid], dim=1)
    assert not torch.allclose(interpolate_pos_embed(swapped, 24), mae_reference(pos, 24), atol=1e-3)
