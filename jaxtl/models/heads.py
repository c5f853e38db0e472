"""Classifier heads: fastai's ``create_head`` and torchvision's plain ``fc``.

fastai head, input (N, h, w, C) -> logits (N, n_out)::

    concat(max_pool, avg_pool) -> (N, 2C) -> BN -> Dropout(0.25) -> Dense(512, no bias) -> ReLU
    -> BN -> Dropout(0.5) -> Dense(n_out, no bias)

Dense kernels use kaiming_normal_ (fan_in, gain sqrt(2), untruncated) and head BatchNorms start at
scale 1, bias 1e-3, as fastai initialises them.

Each head's pooling is parameter-free (``pool``); a head also takes already pooled features ``(N, P)`` (the linear
probe, ``jaxtl.probe``, computes them once and trains the rest of the head on them).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl.models.norm import BatchNorm

kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def concat_pool(x: jax.Array) -> jax.Array:
    """fastai's AdaptiveConcatPool2d + Flatten: (N, h, w, C) -> (N, 2C) as [max, mean]."""
    return jnp.concatenate([jnp.max(x, axis=(1, 2)), jnp.mean(x, axis=(1, 2))], axis=-1)


class FastaiHead(nn.Module):
    num_classes: int
    hidden: int = 512
    dropout: float = 0.5  # fastai's ps: the last dropout is ps, the first ps/2
    dtype: Any = jnp.float32
    axis_name: str | None = None

    pool = staticmethod(concat_pool)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = concat_pool(x) if x.ndim == 4 else x
        x = BatchNorm(dtype=self.dtype, bias_init=1e-3, axis_name=self.axis_name, name="bn1")(x, train)
        x = nn.Dropout(self.dropout / 2, deterministic=not train)(x)
        x = nn.Dense(self.hidden, use_bias=False, kernel_init=kaiming_normal_fan_in, dtype=self.dtype,
                     name="fc1")(x)
        x = nn.relu(x)
        x = BatchNorm(dtype=self.dtype, bias_init=1e-3, axis_name=self.axis_name, name="bn2")(x, train)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, use_bias=False, kernel_init=kaiming_normal_fan_in, dtype=self.dtype,
                     name="fc2")(x)
        return x.astype(jnp.float32)


class LinearHead(nn.Module):
    """torchvision's ``avgpool`` + ``fc``: (N, h, w, C) -> mean over h, w -> Dense(n_out) with bias."""

    num_classes: int
    dtype: Any = jnp.float32

    @staticmethod
    def pool(x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        x = self.pool(x) if x.ndim == 4 else x
        # torchvision's nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        fan_in = x.shape[-1]
        bound = 1.0 / fan_in**0.5
        uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
        x = nn.Dense(self.num_classes, kernel_init=uniform, bias_init=uniform, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
