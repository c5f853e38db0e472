"""An exponential moving average of the weights, updated inside the train step (timm ``ModelEmaV3`` semantics).

After optimiser update number ``t`` (1, 2, ... over the Learner's life: ``TrainState.step + 1``), every float
leaf of the parameters **and** the BatchNorm statistics moves as ``ema <- d_t ema + (1 - d_t) w``
(``optax.incremental_update``) with timm's ``get_decay(t)`` (``update_after_step = 0``, ``min_decay = 0``):

* ``s = max(0, t - 1)``; ``d_t = 0`` when ``s = 0`` (the first update copies the weights);
* otherwise ``d_t = decay`` (``train.ema_decay``), or with ``train.ema_warmup``
  ``d_t = min(decay, 1 - (1 + s / gamma)^(-power))`` with timm's ``gamma = 1``, ``power = 2/3``.

The average lives in ``TrainState.ema`` (``{"params", "batch_stats"}``, float32), so checkpoints carry it and a
resumed run continues it exactly; ``train.eval_ema`` validates (and exports) it instead of the raw weights.
Paper / peer: Polyak & Juditsky (1992) averaging as an EMA; timm ``ModelEmaV3`` (``timm/utils/model_ema.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


@dataclass(frozen=True)
class Ema:
    """``train.ema_decay`` (> 0: on), ``train.ema_warmup`` and timm's warm-up constants."""

    decay: float
    warmup: bool = False
    gamma: float = 1.0
    power: float = 2.0 / 3.0

    @classmethod
    def from_config(cls, train: Any) -> Ema | None:
        """None when ``train.ema_decay`` is 0 (off)."""
        return cls(float(train.ema_decay), bool(train.ema_warmup)) if float(train.ema_decay) > 0 else None

    def decay_at(self, t: jax.Array) -> jax.Array:
        """timm ``get_decay(t)`` for update number ``t`` (1-based), float32."""
        s = jnp.maximum(0, jnp.asarray(t, jnp.int32) - 1).astype(jnp.float32)
        d = jnp.float32(self.decay)
        if self.warmup:
            d = jnp.minimum(d, 1.0 - (1.0 + s / self.gamma) ** (-self.power))
        return jnp.where(s <= 0, 0.0, d)

    def update(self, average: PyTree, weights: PyTree, t: jax.Array) -> PyTree:
        """The average after update ``t`` towards ``weights`` (same structure)."""
        return optax.incremental_update(weights, average, 1.0 - self.decay_at(t))


def start(variables: PyTree) -> PyTree:
    """The average before the first update: a copy of the weights (its own buffers: the step donates both)."""
    return jax.tree.map(jnp.copy, {"params": variables["params"], "batch_stats": variables["batch_stats"]})
