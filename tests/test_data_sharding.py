"""Sharding, epochs and resume: the contract the engine relies on, for both pipelines."""

from __future__ import annotations

import pytest
import torch

from cmae_ds.data import build_pretrain_loader
from cmae_ds.data.pipelines.sampling import ShardPlan

from data_helpers import PIPELINES, cfg, random_jpegs

N = 23  # prime: never divides the world size or the batch


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp('shard')
    random_jpegs(r, N, size=(48, 40))
    return r


def _run(root, pipeline, rank, world, epoch=0, seed=0, drop_last=False, skip=0, batch=4):
    loader = build_pretrain_loader(
        cfg(root, pipeline), img_size=16, batch_size=batch, rank=rank, world_size=world, seed=seed, drop_last=drop_last
    )
    loader.set_epoch(epoch)
    if skip:
        loader.skip_batches(skip)
    return loader, list(loader)


@pytest.mark.parametrize('pipeline', PIPELINES)
@pytest.mark.parametrize('world', [2, 3])
def test_every_image_once_per_epoch(root, pipeline, world):
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            loader, batches = _run(root, pipeline, rank, world, epoch)
            assert len(batches) == len(loader)
            seen += [i for b in batches for i in b['index'].tolist()]
        assert sorted(seen) == list(range(N))


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_drop_last_equal_batches_on_every_rank(root, pipeline):
    lens = set()
    for rank in range(3):
        loader, batches = _run(root, pipeline, rank, 3, drop_last=True)
        assert all(len(b['index']) == 4 for b in batches)
        lens.add(len(batches))
    assert lens == {len(loader)} == {23 // 3 // 4}


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_same_seed_same_batches_new_epoch_new_order(root, pipeline):
    _, a = _run(root, pipeline, 1, 2, epoch=3, seed=7)
    _, b = _run(root, pipeline, 1, 2, epoch=3, seed=7)
    for x, y in zip(a, b):
        assert torch.equal(x['index'], y['index'])
        assert torch.equal(x['img'], y['img']) and torch.equal(x['img_target'], y['img_target'])
    _, c = _run(root, pipeline, 1, 2, epoch=4, seed=7)
    assert not all(torch.equal(x['index'], z['index']) for x, z in zip(a, c))


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_skip_batches_resumes_same_order(root, pipeline):
    _, full = _run(root, pipeline, 0, 2, epoch=2, drop_last=True, batch=2)
    loader, resumed = _run(root, pipeline, 0, 2, epoch=2, drop_last=True, batch=2, skip=2)
    assert len(resumed) == len(full) - 2 and len(loader) == len(full)
    for x, y in zip(full[2:], resumed):
        assert torch.equal(x['index'], y['index'])
        # per-sample draws keyed by (seed, epoch, index) in both pipelines: the views repeat exactly
        assert torch.equal(x['img'], y['img']) and torch.equal(x['img_target'], y['img_target'])
    assert len(list(loader)) == len(full)  # the skip applies to one iteration only


@pytest.mark.parametrize('n,batch,world', [(23, 4, 3), (10, 3, 4), (7, 2, 1), (100, 8, 6)])
@pytest.mark.parametrize('mode', ['drop', 'keep', 'pad'])
def test_shard_plan_counts(n, batch, world, mode):
    for rank in range(world):
        plan = ShardPlan(n, batch, rank, world, seed=1, drop_last=mode == 'drop', pad=mode == 'pad')
        assert plan.num_samples_on_rank() == len(plan.rank_indices(5)[0])
        assert plan.num_batches() == len(plan.batches(5))


def test_shard_plan_padding_flags_repeats():
    seen, invalid = [], 0
    for rank in range(3):
        idx, valid = ShardPlan(10, 4, rank, 3, shuffle=False, drop_last=False, pad=True).rank_indices(0)
        assert len(idx) == 4
        seen += idx[valid].tolist()
        invalid += int((~valid).sum())
    assert sorted(seen) == list(range(10)) and invalid == 2
    with pytest.raises(ValueError, match='rank'):
        ShardPlan(10, 4, 3, 3)
