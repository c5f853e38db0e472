"""ResNet-18/34/50/101/152 in Flax (NHWC), layer for layer as torchvision builds them (v1.5).

Parameter tree (mirrors torchvision's state-dict names so conversion is a rename + transpose)::

    body/conv1, body/bn1, body/layer{1..4}_{j}/{conv1,bn1,conv2,bn2[,conv3,bn3][,downsample_conv,downsample_bn]}

Every 3x3 conv and the stem max-pool pad symmetrically by 1 (torchvision), never Flax's 'SAME' (which
pads (0, 1) at stride 2). Bottleneck blocks stride on the 3x3 conv (v1.5). Built like Flax's examples/imagenet:
the blocks receive ``conv`` and ``norm`` as ``ModuleDef`` partials.
Input (N, H, W, 3) -> features (N, H/32, W/32, C) with C = 512 (18/34) or 2048 (50+).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl.models.kernels import PLAIN
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


PAD3 = ((1, 1), (1, 1))  # torchvision pads 3x3 convs symmetrically by 1 (Flax 'SAME' would pad (0, 1) at stride 2)
PAD1 = ((0, 0), (0, 0))


def feature_dim(arch: str) -> int:
    """Channels of the body's output: 512 for basic-block ResNets, 2048 for bottleneck ones."""
    return 512 if ARCHS[arch][0] == "basic" else 2048


ModuleDef = Any


class Block(nn.Module):
    """A residual block's fields: output planes (before ``expansion``), the conv / norm ``ModuleDef``s, stride,
    whether the shortcut is a 1x1 conv + BN, and torchvision's ``zero_init_residual`` (last BN's scale = 0)."""

    planes: int
    conv: ModuleDef
    norm: ModuleDef
    stride: int = 1
    downsample: bool = False
    zero_init_residual: bool = False


class BasicBlock(Block):
    """3x3 -> BN -> ReLU -> 3x3 -> BN, plus identity or 1x1-conv/BN shortcut, then ReLU."""

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = (self.stride, self.stride)
        y = self.conv(self.planes, (3, 3), s, padding=PAD3, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, train))
        y = self.conv(self.planes, (3, 3), padding=PAD3, name="conv2")(y)
        y = self.norm(name="bn2", scale_init=0.0 if self.zero_init_residual else 1.0)(y, train)
        if self.downsample:
            x = self.conv(self.planes, (1, 1), s, padding=PAD1, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x, train)
        return nn.relu(y + x)


class Bottleneck(Block):
    """1x1 -> 3x3 (stride here, v1.5) -> 1x1 (x4 channels), each followed by BN; shortcut; ReLU."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = (self.stride, self.stride)
        y = self.conv(self.planes, (1, 1), padding=PAD1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, train))
        y = self.conv(self.planes, (3, 3), s, padding=PAD3, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y, train))
        y = self.conv(self.planes * 4, (1, 1), padding=PAD1, name="conv3")(y)
        y = self.norm(name="bn3", scale_init=0.0 if self.zero_init_residual else 1.0)(y, train)
        if self.downsample:
            x = self.conv(self.planes * 4, (1, 1), s, padding=PAD1, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x, train)
        return nn.relu(y + x)


class ResNetBody(nn.Module):
    """The ResNet without pooling/fc: (N, H, W, 3) -> (N, H/32, W/32, C).

    ``conv`` (``nn.Conv`` or a partial of it) and ``max_pool`` are the kernels' way in (``jaxtl/models/kernels.py``;
    ``create_model`` fills them from ``model.kernels``); the defaults are JAX's own ops."""

    arch: str = "resnet34"
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None
    conv: ModuleDef = nn.Conv
    max_pool: Callable[[jax.Array], jax.Array] = PLAIN.max_pool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kind, layers = ARCHS[self.arch]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        conv = partial(self.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32)
        norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.axis_name)
        x = x.astype(self.dtype)
        x = conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x, train))
        x = self.max_pool(x)
        in_ch = 64
        for i, n_blocks in enumerate(layers):
            planes = 64 * 2**i
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                downsample = j == 0 and (stride != 1 or in_ch != planes * block_cls.expansion)
                x = block_cls(planes, conv, norm, stride, downsample, self.zero_init_residual,
                              name=f"layer{i + 1}_{j}")(x, train)
                in_ch = planes * block_cls.expansion
        return x
