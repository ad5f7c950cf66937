"""Two gloo ranks must compute what one rank computes on the joined batch (docs/spec.md section 5)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmae_ds.models import CMAE
from cmae_ds.models.batchnorm import SyncBatchNorm1d

from helpers import debug_cfg, free_port


def _setup(rank, world, port):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)


def _step(model, img, img_t, mask):
    out = model(img, img_t, mask=mask)
    # DeepSpeed averages gradients over ranks; the joined-batch reference is the mean of the per-rank losses.
    out['loss'].backward()
    return out


def _worker(rank, world, port, state, batch, result_path):
    _setup(rank, world, port)
    torch.manual_seed(0)
    model = CMAE(debug_cfg()).train()
    model.load_state_dict(state)
    img, img_t, mask = (t.chunk(world)[rank] for t in batch)
    out = _step(model, img, img_t, mask)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    loss = out['loss'].detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save(
            {
                'loss': loss / world,
                'grads': grads,
                'running_var': model.projector.bn0.running_var.clone(),
                'target_running_mean': model.target.projector.bn0.running_mean.clone(),
            },
            result_path,
        )
    # Both ranks leave together: a rank tearing gloo down while its peer still works aborts the peer's process.
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_equal_one_rank_on_joined_batch(tmp_path):
    torch.manual_seed(0)
    model = CMAE(debug_cfg()).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # running stats change in place
    batch = (torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64), model.random_mask(8, 'cpu'))
    ref = _step(model, *batch)
    path = tmp_path / 'r.pt'
    mp.spawn(_worker, args=(2, free_port(), state, batch, str(path)), nprocs=2, join=True)
    got = torch.load(path, weights_only=True)
    assert torch.allclose(got['loss'], ref['loss'], rtol=1e-5)
    assert torch.allclose(got['running_var'], model.projector.bn0.running_var, rtol=1e-5)
    assert torch.allclose(got['target_running_mean'], model.target.projector.bn0.running_mean, rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        assert torch.allclose(got['grads'][name], p.grad, rtol=1e-4, atol=1e-6), name


def _reference_bn(bn, momentum):
    ref = torch.nn.BatchNorm1d(bn.num_features, momentum=momentum)
    ref.load_state_dict({k: v.float() for k, v in bn.state_dict().items()})
    return ref


@pytest.mark.parametrize('momentum', [0.1, None])
def test_one_process_batchnorm_runs_in_fp32_with_bf16_weights(momentum):
    """The single-rank path next to bf16 weights (a bf16 model, or DeepSpeed's bf16 engine, which leaves buffers
    fp32): statistics kept in fp32, the output what fp32 BatchNorm gives, rounded to the input's dtype."""
    torch.manual_seed(0)
    bn = SyncBatchNorm1d(16, momentum=momentum)
    torch.nn.init.normal_(bn.weight)
    bn = bn.bfloat16()
    assert bn.weight.dtype == torch.bfloat16 and bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    ref = _reference_bn(bn, momentum)
    for _ in range(3):
        x = (torch.randn(8, 16) * 3 + 1).bfloat16()
        y = bn(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, ref(x.float()).bfloat16())
    assert torch.allclose(bn.running_mean, ref.running_mean) and torch.allclose(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 3
    bn.eval(), ref.eval()
    x = torch.randn(4, 16).bfloat16()
    assert torch.equal(bn(x), ref(x.float()).bfloat16())
