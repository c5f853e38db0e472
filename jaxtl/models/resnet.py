"""ResNet-18/34/50/101/152 in Flax (NHWC), layer for layer as torchvision builds them (v1.5).

Parameter tree (mirrors torchvision's state-dict names so conversion is a rename + transpose)::

    body/conv1, body/bn1, body/layer{1..4}_{j}/{conv1,bn1,conv2,bn2[,conv3,bn3][,downsample_conv,downsample_bn]}

Every 3x3 conv and the stem max-pool pad symmetrically by 1 (torchvision), never Flax's 'SAME' (which
pads (0, 1) at stride 2). Bottleneck blocks stride on the 3x3 conv (v1.5).
Input (N, H, W, 3) -> features (N, H/32, W/32, C) with C = 512 (18/34) or 2048 (50+).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl.models.conv import conv_general_dilated
from jaxtl.models.norm import BatchNorm

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# arch -> (block kind, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def feature_dim(arch: str) -> int:
    """Channels of the body's output: 512 for basic-block ResNets, 2048 for bottleneck ones."""
    return 512 if ARCHS[arch][0] == "basic" else 2048


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(
        features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=False, kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32, name=name,
        conv_general_dilated=conv_general_dilated,  # im2col for maps smaller than the kernel (CPU; see conv.py)
    )


class BasicBlock(nn.Module):
    """3x3 -> BN -> ReLU -> 3x3 -> BN, plus identity or 1x1-conv/BN shortcut, then ReLU."""

    planes: int
    stride: int = 1
    downsample: bool = False
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = partial(BatchNorm, dtype=self.dtype, axis_name=self.axis_name)
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(bn(name="bn1")(y, train))
        y = _conv(self.planes, 3, 1, self.dtype, "conv2")(y)
        y = bn(name="bn2", scale_init=0.0 if self.zero_init_residual else 1.0)(y, train)
        if self.downsample:
            x = _conv(self.planes, 1, self.stride, self.dtype, "downsample_conv")(x)
            x = bn(name="downsample_bn")(x, train)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, v1.5) -> 1x1 (x4 channels), each followed by BN; shortcut; ReLU."""

    planes: int
    stride: int = 1
    downsample: bool = False
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = partial(BatchNorm, dtype=self.dtype, axis_name=self.axis_name)
        y = _conv(self.planes, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(bn(name="bn1")(y, train))
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(bn(name="bn2")(y, train))
        y = _conv(self.planes * 4, 1, 1, self.dtype, "conv3")(y)
        y = bn(name="bn3", scale_init=0.0 if self.zero_init_residual else 1.0)(y, train)
        if self.downsample:
            x = _conv(self.planes * 4, 1, self.stride, self.dtype, "downsample_conv")(x)
            x = bn(name="downsample_bn")(x, train)
        return nn.relu(y + x)


def _max_pool_reduce_window(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _max_pool_first_max(x: jax.Array) -> jax.Array:
    """The same pool as nine strided slices of the -inf-padded input; the output takes the *first* maximum of
    each window (row-major, NaN wins), as torch and ``reduce_window``'s gradient do, so gradients go to that
    element only. Differentiable through slices and selects."""
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    taps = [jax.lax.slice(xp, (0, i, j, 0), (n, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
            for i in range(3) for j in range(3)]
    best = jax.lax.stop_gradient(taps[0])
    first = jnp.zeros(best.shape, jnp.int8)
    for k in range(1, 9):
        t = jax.lax.stop_gradient(taps[k])
        better = (t > best) | jnp.isnan(t)
        best, first = jnp.where(better, t, best), jnp.where(better, jnp.int8(k), first)
    out = jnp.where(first == 0, taps[0], jnp.zeros((), x.dtype))
    for k in range(1, 9):
        out = out + jnp.where(first == k, taps[k], jnp.zeros((), x.dtype))
    return out


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torchvision's MaxPool2d(3, 2, padding=1): pads with -inf symmetrically by 1.

    Forward: ``reduce_window``. Backward: the gradient of :func:`_max_pool_first_max` (identical values,
    bitwise): XLA CPU expands ``reduce_window``'s own gradient (``select_and_scatter``) into index iotas, a
    variadic reduce-window and a scatter, 5x slower than nine selects and pads (ResNet stem pool, batch 32 at
    224 px: 399 -> 80 ms for forward + backward on jaxlib 0.10.2). Other backends keep ``reduce_window``'s own
    gradient."""
    return _max_pool_reduce_window(x)


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _max_pool_reduce_window(x), x


def _max_pool_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    pool = _max_pool_first_max if jax.default_backend() == "cpu" else _max_pool_reduce_window
    return jax.vjp(pool, x)[1](g)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


class ResNetBody(nn.Module):
    """The ResNet without pooling/fc: (N, H, W, 3) -> (N, H/32, W/32, C)."""

    arch: str = "resnet34"
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kind, layers = ARCHS[self.arch]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        x = x.astype(self.dtype)
        x = _conv(64, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="bn1")(x, train))
        x = max_pool_3x3_s2(x)
        in_ch = 64
        for i, n_blocks in enumerate(layers):
            planes = 64 * 2**i
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                downsample = j == 0 and (stride != 1 or in_ch != planes * block_cls.expansion)
                x = block_cls(
                    planes, stride, downsample, self.zero_init_residual, self.dtype, self.axis_name,
                    name=f"layer{i + 1}_{j}",
                )(x, train)
                in_ch = planes * block_cls.expansion
        return x
