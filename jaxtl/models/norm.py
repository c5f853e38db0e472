"""BatchNorm with PyTorch's exact train-mode semantics.

Written by hand because ``flax.linen.BatchNorm`` stores the *biased* batch variance in its running
average, while PyTorch (and so fastai and every torchvision checkpoint) stores the *unbiased* one:

    y = (x - mu_B) / sqrt(var_B + eps) * gamma + beta                    (train, biased var_B)
    running_mean <- (1 - m) * running_mean + m * mu_B
    running_var  <- (1 - m) * running_var  + m * var_B * n / (n - 1)      (n = reduced elements)

with PyTorch's momentum m = 0.1. In eval mode the running statistics replace mu_B/var_B. Statistics
are computed in float32 whatever the compute dtype. With ``axis_name`` the batch moments are
averaged across a ``pmap``/``shard_map`` axis (sync BN); under sharded ``jit`` the mean over the
global batch is already global.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """Normalises over all but the last (feature) axis. Params ``scale``/``bias``; stats ``mean``/``var``."""

    momentum: float = 0.1  # PyTorch convention: weight of the new batch statistic
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: float = 1.0
    bias_init: float = 0.0
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.constant(self.scale_init), (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.constant(self.bias_init), (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        axes = tuple(range(x.ndim - 1))
        if train:
            # Two-pass variance mean((x - mu)^2): closer to PyTorch than E[x^2] - mu^2 in float32.
            x32 = x.astype(jnp.float32)
            sync = self.axis_name is not None and not self.is_initializing()
            mean = jnp.mean(x32, axes)
            if sync:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            if sync:
                var = jax.lax.pmean(var, self.axis_name)
            n = 1
            for a in axes:
                n *= x.shape[a]
            if sync:
                n *= jax.lax.psum(1, self.axis_name)
            if not self.is_initializing():
                unbiased = var * (n / jnp.maximum(n - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        shift = bias - mean * mul
        return (x * mul.astype(self.dtype) + shift.astype(self.dtype)).astype(self.dtype)
