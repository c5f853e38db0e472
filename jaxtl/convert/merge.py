"""Put converted ImageNet weights into a freshly initialised jaxtl model (fastai's transfer step)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.convert.mapping import ConversionError

HEADS = ("fastai", "linear")


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _copy(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype


def merge_pretrained(
    init_variables: Mapping[str, Any], pretrained_variables: Mapping[str, Any], head: str = "fastai",
    *, strict: bool = True,
) -> dict[str, Any]:
    """Body parameters and BatchNorm statistics from ``pretrained_variables``, the head from ``init``.

    Every ``params/body/...`` and ``batch_stats/body/...`` leaf of ``init_variables`` is replaced
    by the pretrained one (cast to the init leaf's dtype). The head keeps its fresh initialisation,
    except for ``head="linear"`` when the pretrained tree has an ``fc`` of exactly the same shapes
    (same number of classes): then the pretrained classifier is used too. ``strict`` raises
    :class:`ConversionError` listing every missing, extra or wrongly-shaped body leaf; with
    ``strict=False`` missing/mis-shaped leaves keep their init values.
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r} must be one of {list(HEADS)}")
    init_flat = _flat(init_variables)
    pre_flat = _flat(pretrained_variables)

    def is_body(p: tuple[str, ...]) -> bool:
        return p[0] in ("params", "batch_stats") and len(p) > 1 and p[1] == "body"

    body_init = {p for p in init_flat if is_body(p)}
    body_pre = {p for p in pre_flat if is_body(p)}
    missing = sorted(body_init - body_pre)
    extra = sorted(body_pre - body_init)
    wrong = sorted(p for p in body_init & body_pre if _shape(pre_flat[p]) != _shape(init_flat[p]))
    if strict and (missing or extra or wrong):
        lines = ["merge_pretrained: the pretrained body does not fit the model's body:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join("/".join(p) for p in missing))
        if extra:
            lines.append(f"  unexpected ({len(extra)}): " + ", ".join("/".join(p) for p in extra))
        if wrong:
            lines.append(f"  wrongly-shaped ({len(wrong)}): " + ", ".join(
                f"{'/'.join(p)} pretrained {_shape(pre_flat[p])} vs model {_shape(init_flat[p])}"
                for p in wrong))
        lines.append("Check that model.arch matches the pretrained weights.")
        raise ConversionError("\n".join(lines))

    out = _copy(init_variables)
    for p in body_init & body_pre:
        if p in wrong:
            continue
        _set(out, p, jnp.asarray(pre_flat[p], dtype=_dtype(init_flat[p])))

    if head == "linear":
        fc_init = {p: v for p, v in init_flat.items() if p[:3] == ("params", "head", "fc")}
        fc_pre = {p: v for p, v in pre_flat.items() if p[:3] == ("params", "head", "fc")}
        if fc_init and set(fc_init) == set(fc_pre) and all(
            np.shape(fc_pre[p]) == np.shape(fc_init[p]) for p in fc_init
        ):
            for p in fc_init:
                _set(out, p, jnp.asarray(fc_pre[p], dtype=_dtype(fc_init[p])))
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(out)):
        raise ValueError("merge_pretrained: abstract (shape-only) init leaves need a complete pretrained body "
                         "(strict=True)")
    return jax.tree_util.tree_map(jnp.asarray, out)


def init_with_pretrained(model: Any, rng: jax.Array, pretrained_variables: Mapping[str, Any], head: str = "fastai",
                         sample_size: int = 64) -> dict[str, Any]:
    """``merge_pretrained(model.init(rng, x), pretrained_variables, head)`` without initialising the body that
    the pretrained one replaces: the body's shapes come from ``jax.eval_shape`` (no compile, no random init of
    ~20M parameters) and only the head is initialised, with the same values ``model.init`` gives it (Flax derives
    each module's initialisation key from its path). ``sample_size``: side of the dummy image (parameter shapes do
    not depend on it). A warm start skips one compiled program and its run."""
    x = jax.ShapeDtypeStruct((1, sample_size, sample_size, 3), jnp.float32)
    # one trace of the body gives both its variables' shapes and the head's input shape
    feats, body = jax.eval_shape(
        lambda k: model.init_with_output(k, jnp.zeros(x.shape, x.dtype), train=False, method="features"), rng)
    head_vars = jax.jit(lambda k: model.init(k, jnp.zeros(feats.shape, feats.dtype), train=False,
                                             method="classify"))(rng)
    init: dict[str, Any] = {col: {**body.get(col, {}), **head_vars.get(col, {})}
                            for col in dict.fromkeys([*body, *head_vars])}  # model.init's collection order
    return merge_pretrained(init, pretrained_variables, head)
