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


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torchvision's MaxPool2d(3, 2, padding=1): pads with -inf symmetrically by 1."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


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
