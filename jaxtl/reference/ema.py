"""NumPy (float64) transcription of timm's ``ModelEmaV3`` and the checks of ``jaxtl.ema`` against it.

timm (``timm/utils/model_ema.py``), with ``update_after_step = 0``, ``min_decay = 0``, called as timm's
``train.py`` does after optimiser update number ``t = 1, 2, ...``::

    get_decay(t): s = max(0, t - 1); 0 if s <= 0; warm-up: max(min(1 - (1 + s / gamma) ** -power, decay), 0);
                  else decay
    update:       every floating-point entry of the state dict (parameters and buffers): ema.lerp_(w, 1 - d)

``check_rows()`` returns rows for ``scripts/check_formulas.py``: the decay over 2000 updates and the averaged
parameters / BatchNorm statistics over 60 updates of a random weight sequence, warm-up off and on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import ema

TOL = 1e-6  # float32 jaxtl vs float64 transcription, relative


def timm_get_decay(t: int, decay: float, use_warmup: bool, gamma: float = 1.0, power: float = 2 / 3) -> float:
    s = max(0, t - 1)
    if s <= 0:
        return 0.0
    if use_warmup:
        return max(min(1 - (1 + s / gamma) ** -power, decay), 0.0)
    return decay


def timm_average(weights: list[dict[str, np.ndarray]], decay: float, use_warmup: bool) -> dict[str, np.ndarray]:
    """The EMA after updates 1..len(weights) towards ``weights[t-1]``, starting from ``weights[0]``'s model copy
    (timm deep-copies the model when the EMA is created; the first update copies it again)."""
    average = {k: np.array(v, np.float64) for k, v in weights[0].items()}
    for t, w in enumerate(weights, start=1):
        d = timm_get_decay(t, decay, use_warmup)
        for k in average:
            average[k] = average[k] + (1 - d) * (np.asarray(w[k], np.float64) - average[k])  # torch lerp
    return average


def _rel(a: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    diff = float(np.max(np.abs(np.asarray(a, np.float64) - r)))
    scale = float(np.max(np.abs(r)))
    return diff, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def check_rows(n_updates: int = 60, seed: int = 0) -> list[tuple[str, str, float, float, float, str]]:
    """(rule, quantity, max abs diff, max rel diff, tolerance, source) rows."""
    rows = []
    for decay, warmup in ((0.9, False), (0.99, True)):  # the warm-up reaches the 0.99 cap at update 1001
        cfg = ema.Ema(decay, warmup)
        ts = np.arange(1, 2001)
        got = np.asarray(jax.vmap(cfg.decay_at)(jnp.asarray(ts)), np.float64)
        want = np.array([timm_get_decay(int(t), decay, warmup) for t in ts])
        name = f"EMA (timm ModelEmaV3), decay={decay}, warm-up {'on' if warmup else 'off'}"
        rows.append((name, "decay (2000 updates)", *_rel(got, want), TOL, "jaxtl/ema.py:Ema.decay_at"))
        rng = np.random.default_rng(seed)
        drift = rng.standard_normal((3, 4))
        weights = [{"params": (drift * (1 + 0.1 * t) + 0.3 * rng.standard_normal((3, 4))).astype(np.float32),
                    "batch_stats": (1.0 + 0.05 * t + rng.random(4)).astype(np.float32)} for t in range(n_updates)]
        average = {k: jnp.asarray(v) for k, v in weights[0].items()}
        update = jax.jit(cfg.update)
        for t, w in enumerate(weights, start=1):
            average = update(average, {k: jnp.asarray(v) for k, v in w.items()}, jnp.int32(t))
        want_avg = timm_average(weights, decay, warmup)
        for k in ("params", "batch_stats"):
            rows.append((name, f"{k} ({n_updates} updates)", *_rel(np.asarray(average[k]), want_avg[k]), TOL,
                         "jaxtl/ema.py:Ema.update"))
    return rows
