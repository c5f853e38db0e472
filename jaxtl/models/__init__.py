"""Flax ResNets with torchvision's layout and fastai/torchvision heads.

``create_model(arch, num_classes, head="fastai"|"linear", dtype=jnp.float32, kernels="auto")`` returns a linen
module (``kernels``: ``jaxtl/models/kernels.py``, the only hardware-specific code of the model)::

    variables = model.init(rng, images_nhwc, train=False)          # {"params", "batch_stats"}
    logits = model.apply(variables, images_nhwc, train=False)       # (N, num_classes) float32
    logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})

Two extra methods split the forward pass, e.g. to run a frozen body without its backward pass:
``model.apply(v, x, train, method="features")`` -> (N, h, w, C) and
``model.apply(v, feats, train, method="classify")`` -> logits. ``method="pooled"`` -> (N, P): the body's output
through the head's parameter-free pooling; ``HeadOnly`` (``head_only(model)``) is the rest of the head on such
vectors, with the full model's head parameters (``{"head": ...}``): the linear probe (``jaxtl.probe``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl.models.heads import FastaiHead, LinearHead, concat_pool
from jaxtl.models.kernels import KERNELS, PLAIN, KernelSet, kernel_set
from jaxtl.models.norm import BatchNorm
from jaxtl.models.resnet import ARCHS, ModuleDef, ResNetBody, feature_dim

HEADS = ("fastai", "linear")


class ResNet(nn.Module):
    """Body + head. Parameters: ``{"body": ..., "head": ...}``."""

    arch: str = "resnet34"
    num_classes: int = 1000
    head_kind: str = "fastai"
    dtype: Any = jnp.float32
    zero_init_residual: bool = False
    head_dropout: float = 0.5
    axis_name: str | None = None
    conv: ModuleDef = nn.Conv  # kernels (jaxtl/models/kernels.py): filled by create_model from model.kernels
    max_pool: Callable[[jax.Array], jax.Array] = PLAIN.max_pool

    def setup(self) -> None:
        self.body = ResNetBody(self.arch, self.zero_init_residual, self.dtype, self.axis_name, self.conv,
                               self.max_pool)
        self.head = make_head(self.head_kind, self.num_classes, self.head_dropout, self.dtype, self.axis_name)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.body(x, train)

    def pooled(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.head.pool(self.body(x, train))

    def classify(self, feats: jax.Array, train: bool = False) -> jax.Array:
        return self.head(feats, train)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.classify(self.features(x, train), train)


def make_head(kind: str, num_classes: int, dropout: float, dtype: Any, axis_name: str | None) -> nn.Module:
    """``model.head`` -> its module (``HEADS``)."""
    if kind == "fastai":
        return FastaiHead(num_classes, dropout=dropout, dtype=dtype, axis_name=axis_name)
    return LinearHead(num_classes, dtype=dtype)


class HeadOnly(nn.Module):
    """A ResNet's head on pooled features ``(N, P)`` (``ResNet.pooled``); parameters ``{"head": ...}``."""

    num_classes: int = 1000
    head_kind: str = "fastai"
    dtype: Any = jnp.float32
    head_dropout: float = 0.5
    axis_name: str | None = None

    def setup(self) -> None:
        self.head = make_head(self.head_kind, self.num_classes, self.head_dropout, self.dtype, self.axis_name)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.head(x, train)


def head_only(model: ResNet) -> HeadOnly:
    """The head of ``model`` alone (same kind, classes, dropout, dtype, axis name)."""
    return HeadOnly(model.num_classes, model.head_kind, model.dtype, model.head_dropout, model.axis_name)


def create_model(
    arch: str,
    num_classes: int,
    head: str = "fastai",
    dtype: Any = jnp.float32,
    *,
    zero_init_residual: bool = False,
    head_dropout: float = 0.5,
    axis_name: str | None = None,
    kernels: str | KernelSet = "auto",
) -> ResNet:
    """Build a ResNet; ``dtype`` is the compute precision (parameters stay float32); ``kernels`` is
    ``model.kernels`` (``"auto"``: the CPU kernels when JAX's default backend is the CPU) or a ``KernelSet``."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is not known; choose one of {sorted(ARCHS)}")
    if head not in HEADS:
        raise ValueError(f"model.head={head!r} is not known; choose one of {list(HEADS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    ks = kernel_set(kernels)
    return ResNet(arch, num_classes, head, dtype, zero_init_residual, head_dropout, axis_name, ks.conv,
                  ks.max_pool)


def count_params(params: Any) -> int:
    """Number of trainable scalars in a parameter tree (BatchNorm scale/bias count, running stats not)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


__all__ = [
    "ARCHS", "HEADS", "KERNELS", "BatchNorm", "FastaiHead", "HeadOnly", "KernelSet", "LinearHead", "ResNet",
    "ResNetBody", "concat_pool", "count_params", "create_model", "feature_dim", "head_only", "kernel_set",
    "make_head",
]
