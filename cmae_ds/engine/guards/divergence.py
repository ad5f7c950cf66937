"""When a run has diverged: a non-finite loss or gradient norm, or a loss spike (the loss above `factor` x the
median of the last `window` healthy steps for `consecutive` steps in a row), optionally a gradient-norm spike.

A pure function of the values it is shown: every rank shows it the same all-reduced values (rollback.py), so every
rank reaches the same verdict without a second collective. Its history is plain lists in the run's progress, so a
resume continues with the same history as an uninterrupted run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Verdict:
    reason: str
    first_step: int
    """The first step of the condition (a spike of n steps began n - 1 steps before it was called one)."""


@dataclass(frozen=True)
class SpikeRule:
    factor: float
    """0: off."""
    window: int
    consecutive: int

    def ratio(self, history: list, value: float) -> Optional[float]:
        """value / median of the history, None until the history holds `window` values (or with the rule off)."""
        if self.factor <= 0 or len(history) < self.window:
            return None
        median = statistics.median(history)
        return value / median if median > 0 else None


class DivergenceDetector:
    """`observe` once per optimizer step, with the same values on every rank. `state` (a dict of lists and ints)
    is kept by the caller, in the run's progress."""

    def __init__(self, loss_rule: SpikeRule, grad_rule: SpikeRule, state: dict):
        self.loss_rule, self.grad_rule, self.state = loss_rule, grad_rule, state
        for key in ('losses', 'norms'):
            state.setdefault(key, [])
        for key in ('loss_run', 'norm_run'):
            state.setdefault(key, 0)

    def observe(self, step: int, loss: float, grad_norm: Optional[float], overflow: bool) -> Optional[Verdict]:
        """`grad_norm`: None where the engine does not compute one; `overflow`: DeepSpeed fp16 skipped this step for
        an overflow of the scaled gradients (its own remedy, not an event: the norm is not judged then)."""
        if not math.isfinite(loss):
            return Verdict('non-finite loss', step)
        judged_norm = grad_norm is not None and not overflow
        if judged_norm and not math.isfinite(grad_norm):
            return Verdict('non-finite gradient norm', step)
        verdict = self._spike('loss', self.loss_rule, 'losses', 'loss_run', step, loss)
        if judged_norm:
            verdict = verdict or self._spike('gradient norm', self.grad_rule, 'norms', 'norm_run', step, grad_norm)
        return verdict

    def _spike(self, what: str, rule: SpikeRule, key: str, run_key: str, step: int, value: float) -> Optional[Verdict]:
        history, state = self.state[key], self.state
        ratio = rule.ratio(history, value)
        if ratio is not None and ratio > rule.factor:
            state[run_key] += 1  # a spiking value stays out of the history, so it cannot raise the median
            if state[run_key] >= rule.consecutive:
                n, state[run_key] = state[run_key], 0
                return Verdict(
                    f'{what} spike: {value:.4g} > {rule.factor:g} x median {value / ratio:.4g} of the last '
                    f'{rule.window} steps for {n} step{"s" if n > 1 else ""}',
                    step - n + 1,
                )
            return None
        state[run_key] = 0
        history.append(float(value))
        del history[: max(0, len(history) - rule.window)]
        return None

    def ratio(self, loss: float) -> Optional[float]:
        """The loss over the median of the loss history (measurement: how close a healthy run comes to the rule)."""
        return SpikeRule(1.0, self.loss_rule.window, 1).ratio(self.state['losses'], loss)
