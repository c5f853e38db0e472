"""Metrics: masked on-device sums for validation, host-side summaries, fastai's smoothed train loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

# metric name -> True when lower is better (checkpoint selection via config.train.metric)
LOWER_IS_BETTER: dict[str, bool] = {
    "valid_loss": True,
    "error_rate": True,
    "accuracy": False,
    "top_5_accuracy": False,
    "train_loss": True,
}


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the unmasked examples of a batch: ``loss``, ``correct``, ``count`` and, when there are more
    than 5 classes, ``top5`` (label among the 5 largest logits). Padded examples (mask False) count nowhere."""
    logits = logits.astype(jnp.float32)
    w = mask.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    out = {"loss": jnp.sum(loss * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w)}
    if logits.shape[-1] > 5:
        label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
        # rank = number of classes with a strictly larger logit; top-5 when rank < 5
        rank = jnp.sum(logits > label_logit, axis=-1)
        out["top5"] = jnp.sum((rank < 5).astype(jnp.float32) * w)
    return out


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
    """Turn accumulated ``eval_sums`` into ``valid_loss``, ``error_rate``, ``accuracy`` [, ``top_5_accuracy``]."""
    n = float(sums["count"])
    if n <= 0:
        raise ValueError("no validation examples were seen (count == 0); check the data's valid split")
    acc = float(sums["correct"]) / n
    out = {"valid_loss": float(sums["loss"]) / n, "error_rate": 1.0 - acc, "accuracy": acc}
    if "top5" in sums:
        out["top_5_accuracy"] = float(sums["top5"]) / n
    return out


def add_sums(total: dict[str, float] | None, sums: Mapping[str, float]) -> dict[str, float]:
    """Accumulate host-side copies of ``eval_sums`` (float64 on the host)."""
    total = dict(total or {})
    for k, v in sums.items():
        total[k] = total.get(k, 0.0) + float(v)
    return total


def is_better(metric: str, new: float, best: float | None) -> bool:
    """Whether ``new`` improves on ``best`` for ``metric`` (``best`` None: always)."""
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"config field train.metric={metric!r} is not known; choose one of "
                         f"{sorted(LOWER_IS_BETTER)}")
    if best is None or math.isnan(best):
        return not math.isnan(new)
    return new < best if LOWER_IS_BETTER[metric] else new > best


@dataclass
class SmoothLoss:
    """fastai's ``AvgSmoothLoss``: debiased exponential moving average of the batch loss (beta 0.98).

    fastai shows this value as ``train_loss`` in its epoch table and records it per step for ``lr_find``.
    """

    beta: float = 0.98
    val: float = 0.0
    count: int = 0

    def update(self, loss: float) -> float:
        self.count += 1
        self.val = self.beta * self.val + (1 - self.beta) * loss  # torch.lerp(loss, val, beta)
        return self.value

    @property
    def value(self) -> float:
        if self.count == 0:
            return float("nan")
        return self.val / (1 - self.beta**self.count)

    def reset(self) -> None:
        self.val, self.count = 0.0, 0

    def state_dict(self) -> dict[str, float]:
        return {"val": self.val, "count": self.count}

    def load_state_dict(self, d: Mapping[str, float]) -> None:
        self.val, self.count = float(d["val"]), int(d["count"])
