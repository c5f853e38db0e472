"""Layer groups, freezing and discriminative learning rates, as fastai does them for a ResNet.

fastai splits a ResNet into three parameter groups (``_resnet_split``: ``m[0][:6], m[0][6:], m[1:]``)::

    group 0 = body/conv1, body/bn1, body/layer1_*, body/layer2_*
    group 1 = body/layer3_*, body/layer4_*
    group 2 = head/*

``freeze_to(n)`` freezes groups ``0 .. n-1`` (``n < 0`` counts from the end, so ``freeze() == freeze_to(-1)``
freezes all but the head); with ``train_bn`` the normalisation parameters of frozen groups keep training.
Weight decay never applies to normalisation parameters nor to biases (fastai's ``wd_bn_bias=False``).

Every function here reads only the *paths* of a parameter tree, so it works on concrete arrays, on tracers,
on ``jax.eval_shape`` results and on the ``optax.MaskedNode``-holed trees that ``optax.partition`` passes
to its inner transformations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

N_GROUPS = 3
FROZEN = "frozen"
PathLike = str | Sequence[Any]

# A parameter belongs to a normalisation layer when it is named scale/bias and its module's name looks like
# one: torchvision-style ``bn1``/``downsample_bn``, or Flax auto-names ``BatchNorm_0``/``LayerNorm_1``/``GroupNorm_0``.
_NORM_MODULE = re.compile(r"(^|_)(bn|ln|gn)\d*$|norm", re.IGNORECASE)
_NORM_PARAMS = ("scale", "bias")


def path_keys(path: PathLike) -> tuple[str, ...]:
    """Normalise a path to a tuple of strings.

    Accepts a ``jax.tree_util`` key path (``DictKey``/``GetAttrKey``/``SequenceKey`` entries), a tuple of
    strings, or a ``"a/b/c"`` string. A leading ``"params"`` collection name is dropped.
    """
    if isinstance(path, str):
        keys = tuple(k for k in path.split("/") if k)
    else:
        keys = []
        for k in path:
            if isinstance(k, jax.tree_util.DictKey):
                keys.append(str(k.key))
            elif isinstance(k, jax.tree_util.GetAttrKey):
                keys.append(str(k.name))
            elif isinstance(k, jax.tree_util.SequenceKey):
                keys.append(str(k.idx))
            elif isinstance(k, jax.tree_util.FlattenedIndexKey):
                keys.append(str(k.key))
            else:
                keys.append(str(k))
        keys = tuple(keys)
    if keys and keys[0] == "params":
        keys = keys[1:]
    return keys


def layer_group(path: PathLike) -> int:
    """fastai's ResNet split: 0 = stem + layer1 + layer2, 1 = layer3 + layer4, 2 = head."""
    keys = path_keys(path)
    if keys and keys[0] == "head":
        return 2
    if len(keys) >= 2 and keys[0] == "body":
        block = keys[1]
        if block in ("conv1", "bn1") or block.startswith(("layer1_", "layer2_")):
            return 0
        if block.startswith(("layer3_", "layer4_")):
            return 1
    raise ValueError(f"parameter {'/'.join(keys)!r} is in no layer group; expected body/conv1, body/bn1, "
                     "body/layer{1..4}_*, or head/*")


def is_norm(path: PathLike) -> bool:
    """True for the scale/bias of a normalisation layer (what ``train_bn`` keeps trainable)."""
    keys = path_keys(path)
    return len(keys) >= 2 and keys[-1] in _NORM_PARAMS and bool(_NORM_MODULE.search(keys[-2]))


def is_norm_or_bias(path: PathLike) -> bool:
    """True for normalisation parameters and for every bias (fastai's ``norm_bias_params``): no weight decay."""
    keys = path_keys(path)
    return is_norm(keys) or (bool(keys) and keys[-1] == "bias")


def n_frozen(n: int, n_groups: int = N_GROUPS) -> int:
    """fastai's ``frozen_idx``: ``freeze_to(n)`` freezes ``n`` groups, or ``n_groups + n`` when ``n < 0``."""
    idx = n if n >= 0 else n_groups + n
    if not 0 <= idx <= n_groups:
        raise ValueError(f"cannot freeze {n} of {n_groups} groups")
    return idx


def label_of(path: PathLike, n_frozen_groups: int, train_bn: bool = True, n_groups: int = N_GROUPS) -> str:
    """``"frozen"`` or ``"g{k}"`` (k = layer group) for one parameter; see :func:`param_labels`."""
    group = layer_group(path)
    if group < n_frozen(n_frozen_groups, n_groups) and not (train_bn and is_norm(path)):
        return FROZEN
    return f"g{group}"


def group_labels(params: Any) -> Any:
    """Tree of ``"g{k}"`` labels, whatever is frozen (used when the optimiser state must keep its structure)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: f"g{layer_group(p)}", params)


def param_labels(params: Any, n_frozen_groups: int = 0, train_bn: bool = True) -> Any:
    """Tree of labels for ``optax.partition``: ``"frozen"`` for frozen leaves, else ``"g0"``, ``"g1"``, ``"g2"``.

    ``n_frozen_groups`` follows ``freeze_to(n)``: 0 = unfreeze, -1 (or 2) = freeze, 1 = freeze_to(1).
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: label_of(p, n_frozen_groups, train_bn), params)


def trainable_mask(params: Any, n_frozen_groups: int = 0, train_bn: bool = True) -> Any:
    """Bool tree: True where the parameter trains under ``freeze_to(n_frozen_groups)``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: label_of(p, n_frozen_groups, train_bn) != FROZEN, params)


def wd_mask(params: Any) -> Any:
    """Bool tree: True where weight decay applies (not a normalisation parameter, not a bias)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: not is_norm_or_bias(p), params)


def even_mults(start: float, stop: float, n: int) -> list[float]:
    """fastcore's ``even_mults``: ``start * (stop/start) ** (i/(n-1))`` for i = 0..n-1 (``[stop]`` when n = 1)."""
    if n == 1:
        return [float(stop)]
    step = (stop / start) ** (1 / (n - 1))
    return [float(start * step**i) for i in range(n)]


def lr_for_groups(lr: float | slice | Sequence[float], n_groups: int = N_GROUPS) -> list[float]:
    """One learning rate per group, as fastai's ``Optimizer.set_hyper`` spreads ``lr``.

    - a number: the same rate for every group;
    - ``slice(lo, hi)`` or a tuple ``(lo, hi)``: ``even_mults(lo, hi, n_groups)`` (geometric spread);
    - ``slice(hi)`` (or a falsy ``lo``, as fastai tests ``if v.start``): ``hi/10`` for all but the last group;
    - a list (or array) of ``n_groups`` numbers: used as given.
    """
    if isinstance(lr, tuple) and len(lr) == 2:  # (lo, hi) reads as slice(lo, hi); a list is one lr per group
        lr = slice(*lr)
    if isinstance(lr, slice):
        if lr.stop is None:
            raise ValueError("a learning-rate slice needs a stop value: slice(hi) or slice(lo, hi)")
        if lr.start:
            return even_mults(lr.start, lr.stop, n_groups)
        return [lr.stop / 10] * (n_groups - 1) + [float(lr.stop)]
    if np.ndim(lr) == 0:
        return [float(lr)] * n_groups
    values = [float(v) for v in lr]
    if len(values) == 1:
        return values * n_groups
    if len(values) != n_groups:
        raise ValueError(f"got {len(values)} learning rates for {n_groups} parameter groups")
    return values
