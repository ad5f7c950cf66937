"""Data a run skips after a rollback, in global positions of an epoch's order (data.sampling.ShardPlan): after k
micro-batches on each of W ranks of b images, a run has read positions [0, k x b x W) of the epoch's order, whatever
W and b are. A skipped range is therefore the same images on any world size, and a resume on another layout jumps
over it too (rounded outwards to whole optimizer steps, so not one of its images is read).

A range is `[epoch, start, end]` (plain ints: it lives in checkpoints and in rollbacks.json).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """How this run walks an epoch: images per optimizer step (the global batch) and steps per epoch."""

    global_batch: int
    steps_per_epoch: int

    @property
    def epoch_images(self) -> int:
        return self.global_batch * self.steps_per_epoch


def ranges_between(start: tuple[int, int], end: tuple[int, int], layout: Layout) -> list[list[int]]:
    """The ranges covering (epoch, image position) `start` up to `end` (exclusive); an end past the epoch's last
    step spills into the next epochs."""
    (epoch, pos), (end_epoch, end_pos) = start, end
    size = layout.epoch_images
    end_epoch, end_pos = end_epoch + end_pos // size, end_pos % size
    out = []
    while (epoch, pos) < (end_epoch, end_pos):
        stop = end_pos if epoch == end_epoch else size
        if stop > pos:
            out.append([epoch, pos, stop])
        epoch, pos = epoch + 1, 0
    return out


def _overlap(ranges: list, epoch: int, lo: int, hi: int) -> int:
    """The largest end of a range of `epoch` overlapping [lo, hi), or -1."""
    return max((end for e, start, end in ranges if e == epoch and start < hi and end > lo), default=-1)


def first_unskipped(ranges: list, epoch: int, step_in_epoch: int, layout: Layout) -> tuple[int, int]:
    """(epoch, step in epoch) of the first optimizer step at or after the given one whose images are all outside
    the ranges."""
    g = layout.global_batch
    while True:
        if step_in_epoch >= layout.steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
            continue
        end = _overlap(ranges, epoch, step_in_epoch * g, (step_in_epoch + 1) * g)
        if end < 0:
            return epoch, step_in_epoch
        step_in_epoch = -(-end // g)


def skipped_positions(ranges: list, epoch: int) -> list[tuple[int, int]]:
    """[(start, end)] of `epoch`, merged and sorted."""
    spans = sorted((s, e) for ep, s, e in ranges if ep == epoch)
    merged: list[list[int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def dataset_indices(plan, ranges: list) -> list[int]:
    """The dataset indices of the images in `ranges` (sorted), from the epochs' orders of `plan` (a ShardPlan)."""
    out: set[int] = set()
    for epoch in sorted({r[0] for r in ranges}):
        order = plan.epoch_order(epoch)
        for s, e in skipped_positions(ranges, epoch):
            out.update(order[s:e].tolist())
    return sorted(out)
