"""Linear-probe pieces: MAE's LARS step, the frozen encoder, the BatchNorm head."""

import torch

from cmae_ds.config import ModelConfig
from cmae_ds.engine.optim import LARS, probe_param_groups
from cmae_ds.models import build_probe


def test_lars_step_is_maes():
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    update = w.grad + 0.1 * w0
    trust = 0.001 * w0.norm() / update.norm()
    assert torch.allclose(w.detach(), w0 - 0.5 * trust * update, atol=1e-7)
    assert torch.allclose(b.detach(), b0 - 0.5 * b.grad, atol=1e-7)  # 1-D: no adaptation, no weight decay


def test_probe_trains_only_its_linear_layer_and_keeps_the_encoder_in_eval_mode():
    probe = build_probe(ModelConfig(size='debug', img_size=32, patch_size=8), 5, img_size=48).train()
    assert not probe.encoder.training and probe.head.training
    groups = probe_param_groups(probe, 0.0)
    assert groups[0]['names'] == ['head.1.weight', 'head.1.bias']
    bn = probe.head[0]
    assert bn.weight is None and bn.eps == 1e-6
    logits = probe(torch.randn(3, 3, 48, 48))
    logits.sum().backward()
    assert logits.shape == (3, 5) and all(p.grad is None for p in probe.encoder.parameters())
