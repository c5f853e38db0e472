"""fastai's schedules as optax-style functions of the step: one-cycle, fine_tune's phases, lr_find's sweep and rule.

One-cycle (fastai ``fit_one_cycle`` = ``combined_cos``), step ``t`` of ``N`` at position ``pos = t/N``::

    cos_anneal(a, b, x) = a + (1 + cos(pi * (1 - x))) * (b - a) / 2            (fastai's SchedCos)
    lr(pos)  = cos_anneal(lr_max/div, lr_max, pos/pct)                 if pos <  pct
             = cos_anneal(lr_max, lr_max/div_final, (pos-pct)/(1-pct)) if pos >= pct
    mom(pos) = same two segments with moms[0] -> moms[1] -> moms[2]

The schedules are written by hand rather than with ``optax.join_schedules``: fastai's segment boundary
``pct * N`` is fractional and the second segment's position is measured from it, which integer-step
boundaries cannot express. They are evaluated in the numerically stable form
``a * sin^2(pi (1 - x) / 2) + b * sin^2(pi x / 2)`` (equal to ``cos_anneal`` since
``(1 + cos(pi (1 - x))) / 2 = sin^2(pi x / 2)``) with ``1 - x`` taken from integer step differences, so the
float32 values keep ~1e-6 *relative* accuracy even at the end of the cycle where ``lr = lr_max/1e5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxtl.groups import N_GROUPS, even_mults, lr_for_groups

Schedule = Callable[[jnp.ndarray | int], jnp.ndarray]
# train.recipe -> the fastai defaults of its one-cycle phases for train.pct_start / train.div (-1 in the config).
# ``jaxtl.learner.run_recipe`` runs them: fine_tune (fine_tune_plan), one_cycle (one fit_one_cycle), lr_find,
# linear_probe (jaxtl.probe: the head's fit_one_cycle on features computed once; one_cycle's defaults).
RECIPES: dict[str, dict[str, float]] = {"fine_tune": {"pct_start": 0.3, "div": 5.0},
                                        "one_cycle": {"pct_start": 0.25, "div": 25.0}, "lr_find": {},
                                        "linear_probe": {}}


def cos_anneal(start: float, end: float, pos: float) -> float:
    """fastai's ``SchedCos``: ``start + (1 + cos(pi (1 - pos))) (end - start) / 2`` (host-side, float64)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def _sin2_half_pi(x: jnp.ndarray) -> jnp.ndarray:
    """sin^2(pi x / 2) = (1 - cos(pi x)) / 2, the weight of the segment's end value at position x."""
    return jnp.square(jnp.sin(jnp.pi / 2 * x))


def combined_cos(total_steps: int, pct: float, start: Sequence[float] | float, middle: Sequence[float] | float,
                 end: Sequence[float] | float) -> Schedule:
    """Step -> value of fastai's ``combined_cos(pct, start, middle, end)`` over ``total_steps`` steps.

    Values may be scalars or equal-length sequences (one per layer group); the schedule then returns an array.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= pct <= 1.0:
        raise ValueError(f"pct_start must be in [0, 1], got {pct}")
    a, m, b = (jnp.asarray(np.asarray(v, np.float32)) for v in (start, middle, end))
    n = float(total_steps)
    n1 = n * pct  # first-segment length in steps (fractional, as fastai's pct boundary)
    n2 = n * (1.0 - pct)

    # n1 is fractional: t - n1 is formed as the exact integer (step - floor(n1)) minus the constant frac(n1),
    # so it keeps full float32 precision near the boundary (float32(n1) alone is off by up to ulp(n1)/2, a large
    # relative error of a small t - n1; a hi + lo split does not survive XLA's constant reassociation).
    k1 = math.floor(n1)
    frac1 = np.float32(n1 - k1)

    def schedule(step: jnp.ndarray | int) -> jnp.ndarray:
        s = jnp.clip(jnp.asarray(step).astype(jnp.int32), 0, total_steps)
        t = s.astype(jnp.float32)
        in_first = t / n < jnp.float32(pct)  # fastai: segment index = max k with pos >= pcts[k]
        t_minus_n1 = (s - k1).astype(jnp.float32) - frac1
        # segment 1: x = t / n1, 1 - x = (n1 - t) / n1 ; segment 2: x = (t - n1) / n2, 1 - x = (n - t) / n2
        d1 = jnp.float32(n1 if n1 > 0 else 1.0)  # n1 = 0: segment 1 is never selected
        x1, r1 = t / d1, -t_minus_n1 / d1
        if n2 > 0:
            x2, r2 = t_minus_n1 / jnp.float32(n2), (total_steps - s).astype(jnp.float32) / jnp.float32(n2)
        else:  # pct = 1: only t = N reaches segment 2; return its start value (fastai would divide 0 by 0)
            x2, r2 = jnp.zeros_like(t), jnp.ones_like(t)
        v1 = a * _sin2_half_pi(r1) + m * _sin2_half_pi(x1)
        v2 = m * _sin2_half_pi(r2) + b * _sin2_half_pi(x2)
        return jnp.where(in_first, v1, v2)

    return schedule


def one_cycle(
    total_steps: int,
    lr_max: float | Sequence[float],
    div: float = 25.0,
    div_final: float = 1e5,
    pct_start: float = 0.25,
    moms: Sequence[float] = (0.95, 0.85, 0.95),
) -> tuple[Schedule, Schedule]:
    """fastai's ``fit_one_cycle`` schedules ``(lr_schedule, momentum_schedule)``, step 0 = first batch.

    lr: cosine ``lr_max/div -> lr_max`` over ``pct_start`` of the steps, then ``lr_max -> lr_max/div_final``.
    momentum (beta1 for Adam/LAMB, momentum for SGD): cosine ``moms[0] -> moms[1]`` then ``moms[1] -> moms[2]``.
    With ``lr_max`` a sequence (one per layer group) the lr schedule returns an array of that length.
    """
    lr = np.asarray(lr_max, np.float64)
    lr_sched = combined_cos(total_steps, pct_start, lr / div, lr, lr / div_final)
    mom_sched = combined_cos(total_steps, pct_start, moms[0], moms[1], moms[2])
    return lr_sched, mom_sched


def split_schedule(schedule: Schedule, n: int) -> list[Schedule]:
    """An array-valued schedule (one value per group) -> ``n`` scalar schedules, for ``build_optimizer``."""
    return [lambda step, i=i: schedule(step)[i] for i in range(n)]


class Phase(NamedTuple):
    """One ``fit_one_cycle`` call of a recipe. ``n_frozen`` follows ``freeze_to``; ``lrs`` has one lr per group."""

    n_frozen: int
    epochs: int
    lrs: tuple[float, ...]
    pct_start: float
    div: float


def fine_tune_plan(
    epochs: int,
    base_lr: float = 2e-3,
    freeze_epochs: int = 1,
    lr_mult: float = 100.0,
    pct_start: float = 0.3,
    div: float = 5.0,
    n_groups: int = N_GROUPS,
) -> list[Phase]:
    """fastai's ``fine_tune`` as a list of one-cycle phases::

        freeze(); fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)        # div = 25 (default)
        base_lr /= 2; unfreeze(); fit_one_cycle(epochs, slice(base_lr/lr_mult, base_lr), pct_start, div)

    A phase with 0 epochs (fastai runs no batch) is left out; the halving of ``base_lr`` still happens.
    """
    phases = []
    if freeze_epochs > 0:
        phases.append(Phase(n_groups - 1, freeze_epochs, tuple(lr_for_groups(slice(base_lr), n_groups)), 0.99, 25.0))
    base_lr /= 2
    if epochs > 0:
        lrs = tuple(even_mults(base_lr / lr_mult, base_lr, n_groups))
        phases.append(Phase(0, epochs, lrs, pct_start, div))
    return phases


# ----------------------------------------------------------------------------------------------- lr_find


def lr_find_schedule(start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100) -> Schedule:
    """fastai's ``LRFinder`` sweep (``SchedExp``): ``lr(t) = start_lr * (end_lr/start_lr) ** (t/num_it)``."""
    num_it = max(num_it, 6)  # fastai: ``if num_it < 6: num_it = 6``
    log_start, log_ratio = math.log(start_lr), math.log(end_lr / start_lr)
    return lambda step: jnp.exp(log_start + log_ratio * jnp.asarray(step, jnp.float32) / num_it)


def lr_find_diverged(smooth_loss: float, best_loss: float) -> bool:
    """fastai's stop rule (``stop_div``): the smoothed loss exceeds 4x the best smoothed loss so far.

    As in fastai a NaN loss does not stop the sweep (NaN > x is False); :func:`suggest_lr` cuts at the first NaN.
    """
    return bool(smooth_loss > 4 * best_loss)


def valley(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, int]:
    """fastai's ``valley`` rule -> (suggested lr, its index).

    ``lds[i] = 1 + max{lds[j] : j < i, losses[j] > losses[i]}`` (1 if no such j) is the length of the longest
    strictly decreasing subsequence ending at ``i``. With ``L = max(lds)`` reached first at ``max_end``,
    fastai sets ``max_start = max_end - L`` (0 when L = 1: it is never assigned) and suggests index
    ``max_start + int(d/3) + int(d/6)``, ``d = max_end - max_start``. fastai's double loop updates
    ``max_start`` inside the inner loop, but ``lds[i]`` cannot grow past ``max(lds[:i]) + 1``, so it always ends
    as ``max_end - lds[max_end]``; the recurrence is vectorised over ``j`` here. As in fastai, a decreasing
    prefix gives ``max_start = -1`` and, for a two-point valley, index -1 (the last lr).
    """
    loss = np.asarray(losses, np.float64)
    n = len(loss)
    if n == 0 or len(lrs) != n:
        raise ValueError(f"valley needs equal, non-empty lrs and losses (got {len(lrs)} and {n})")
    lds = np.ones(n, np.int64)
    for i in range(1, n):
        higher = loss[:i] > loss[i]
        if higher.any():
            lds[i] = lds[:i][higher].max() + 1
    max_end = int(np.argmax(lds))  # first index of the maximum, as fastai's strict ``<`` test keeps
    max_start = max_end - int(lds[max_end]) if lds[max_end] > 1 else 0
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), int(idx)


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], num_it: int = 100) -> tuple[float, int]:
    """fastai's ``lr_find`` suggestion: ``valley`` on ``lrs[num_it//10:-5]``, cut at the first NaN loss.

    ``losses`` are the recorded smoothed losses. Returns (lr, index into the full lists).
    """
    lo = num_it // 10
    lr_a = np.asarray(lrs, np.float64)[lo:-5]
    loss_a = np.asarray(losses, np.float64)[lo:-5]
    nan = np.flatnonzero(np.isnan(loss_a))
    if nan.size:
        lr_a, loss_a = lr_a[: nan[0]], loss_a[: nan[0]]
    if loss_a.size == 0:
        raise ValueError(f"lr_find recorded {len(losses)} losses: too few to suggest a rate (need > num_it//10 + 5)")
    lr, idx = valley(lr_a, loss_a)
    return lr, lo + idx % len(loss_a)
