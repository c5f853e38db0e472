"""Plain-Python (float64) transcriptions of fastai's schedules, lr spreading and lr_find rule (checks only).

Transcribed from ``fastai/callback/schedule.py`` (``SchedCos``, ``SchedExp``, ``combine_scheds``,
``combined_cos``, ``fit_one_cycle``, ``fine_tune``, ``valley``, ``lr_find``), ``fastai/optimizer.py``
(``set_hyper``'s slice handling), ``fastcore.basics.even_mults`` and ``fastai/learner.py``
(``AvgSmoothLoss``), in their own loop-by-loop form. Nothing here imports jaxtl.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def sched_cos(start: float, end: float, pos: float) -> float:
    """SchedCos: start + (1 + cos(pi*(1-pos))) * (end-start) / 2."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def sched_exp(start: float, end: float, pos: float) -> float:
    """SchedExp: start * (end/start) ** pos."""
    return start * (end / start) ** pos


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Callable[[float], float]]) -> Callable[[float], float]:
    """combine_scheds: segment idx = min(max{k: pos >= cumsum([0]+pcts)[k]}, len(pcts)-1), local position."""
    cum = [0.0]
    for p in pcts:
        cum.append(cum[-1] + p)
    pct_lim = len(cum) - 2

    def inner(pos: float) -> float:
        idx = min(max(k for k, c in enumerate(cum) if pos >= c), pct_lim)
        actual_pos = (pos - cum[idx]) / (cum[idx + 1] - cum[idx])
        return scheds[idx](actual_pos)

    return inner


def combined_cos(pct: float, start: float, middle: float, end: float) -> Callable[[float], float]:
    """combined_cos: cosine start -> middle over pct of training, then middle -> end."""
    return combine_scheds([pct, 1 - pct], [lambda x: sched_cos(start, middle, x), lambda x: sched_cos(middle, end, x)])


def one_cycle_values(n_steps: int, lr_max: float, div: float = 25.0, div_final: float = 1e5, pct_start: float = 0.25,
                     moms: Sequence[float] = (0.95, 0.85, 0.95)) -> tuple[list[float], list[float]]:
    """fit_one_cycle's (lr, mom) at every batch: ParamScheduler sets them before batch t at pct_train = t/n."""
    lr_f = combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final)
    mom_f = combined_cos(pct_start, *moms)
    return [lr_f(t / n_steps) for t in range(n_steps)], [mom_f(t / n_steps) for t in range(n_steps)]


def even_mults(start: float, stop: float, n: int) -> list[float]:
    """fastcore even_mults: start * step**i with step = (stop/start)**(1/(n-1))."""
    if n == 1:
        return [stop]
    mult = stop / start
    step = mult ** (1 / (n - 1))
    return [start * (step**i) for i in range(n)]


def set_hyper_lrs(v: float | slice, n_groups: int) -> list[float]:
    """Optimizer.set_hyper: slice(start, stop) -> even_mults if start else [stop/10]*(n-1) + [stop]."""
    if isinstance(v, slice):
        if v.start:
            return even_mults(v.start, v.stop, n_groups)
        return [v.stop / 10] * (n_groups - 1) + [v.stop]
    return [v] * n_groups


def fine_tune_calls(epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100,
                    pct_start: float = 0.3, div: float = 5.0, n_groups: int = 3) -> list[dict]:
    """The two (freeze_to, fit_one_cycle) calls fine_tune makes, with fit_one_cycle's defaults filled in."""
    calls = [dict(freeze_to=-1, n_epoch=freeze_epochs, lrs=set_hyper_lrs(slice(base_lr), n_groups),
                  pct_start=0.99, div=25.0)]
    base_lr /= 2
    calls.append(dict(freeze_to=0, n_epoch=epochs, lrs=set_hyper_lrs(slice(base_lr / lr_mult, base_lr), n_groups),
                      pct_start=pct_start, div=div))
    return calls


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """AvgSmoothLoss: val = lerp(loss, val, beta) = loss + beta*(val - loss); value = val / (1 - beta**count)."""
    val, count, out = 0.0, 0, []
    for loss in losses:
        count += 1
        val = loss + beta * (val - loss)
        out.append(val / (1 - beta**count))
    return out


def valley(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, int]:
    """fastai's valley, loop for loop (the max_end/max_start test sits inside the j loop, as in fastai).

    Returns (lr, idx); idx may be -1 (Python's last element) for a two-point decreasing curve, as in fastai.
    """
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), idx


def lr_find_suggestion(lrs: Sequence[float], losses: Sequence[float], num_it: int = 100) -> tuple[float, int]:
    """lr_find: valley on lrs[num_it//10:-5], losses[num_it//10:-5], cut before the first NaN loss."""
    lo = num_it // 10
    lrs_s, losses_s = list(lrs[lo:-5]), list(losses[lo:-5])
    for k, loss in enumerate(losses_s):
        if math.isnan(loss):
            lrs_s, losses_s = lrs_s[:k], losses_s[:k]
            break
    lr, idx = valley(lrs_s, losses_s)
    return lr, lo + (idx if idx >= 0 else len(lrs_s) + idx)
