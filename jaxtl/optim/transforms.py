"""jaxtl's optimisers as ``optax.GradientTransformation`` factories (equations: docs/formulas.md).

All four are built from optax pieces inside ``optax.inject_hyperparams``, so ``learning_rate`` and
``b1``/``momentum`` may be schedules (functions of the step count, step 0 = first update); constants are
wrapped as schedules too, which keeps the optimiser-state structure the same whichever is given.

- :func:`adam`: fastai's ``Adam`` (β=(0.9, 0.99), ε=1e-5 outside the square root, bias correction,
  decoupled decay ``p <- p (1 - lr wd)``) = ``scale_by_adam`` + ``add_decayed_weights`` + ``scale_by_learning_rate``.
- :func:`lamb`: You et al. 2020, Algorithm 2 = ``optax.lamb`` (trust ratio ||x|| / ||r + λx||).
- :func:`lamb_fastai`: fastai's ``Lamb``: trust ratio ||x (1 - lr wd)|| / ||r||, capped at 10, decay outside it.
- :func:`sgd`: momentum ``b <- μ b + g`` (PyTorch/fastai form), optional Nesterov, decoupled decay.

``trainable`` (a bool tree, or a function of the parameter tree returning one) freezes leaves *inside* one
transformation: frozen leaves get a zero update and their optimiser state is left untouched, while the
schedule position still advances. ``wd_mask`` (default :func:`jaxtl.groups.wd_mask`: no decay on
normalisation parameters and biases) selects where weight decay applies; pass callables, not trees,
when the transformation runs inside ``optax.partition`` (it hands over trees holed with ``optax.MaskedNode``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl import groups

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]
MaskOrFn = Any  # bool pytree, or a callable params -> bool pytree

LAMB_FASTAI_MAX_RATIO = 10.0  # fastai's lamb_step: q = min(r1 / r2, 10)


class _Constant:
    """A constant schedule (a class rather than a lambda, so that it prints as its value)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def __call__(self, count: jax.Array) -> jax.Array:
        del count
        return jnp.asarray(self.value, jnp.float32)

    def __repr__(self) -> str:
        return f"constant({self.value})"


def _as_schedule(x: ScalarOrSchedule) -> Callable[[jax.Array], jax.Array]:
    return x if callable(x) else _Constant(x)


def _resolve(mask: MaskOrFn, tree: Any) -> Any:
    return mask(tree) if callable(mask) else mask


def _default_wd_mask(wd_mask: MaskOrFn | None) -> MaskOrFn:
    return groups.wd_mask if wd_mask is None else wd_mask


# --------------------------------------------------------------------------------------------- freezing


def _is_param_shaped(node: Any, treedef: Any, shapes: list[tuple[int, ...]]) -> bool:
    leaves, nd = jax.tree_util.tree_flatten(node)
    return nd == treedef and [np.shape(x) for x in leaves] == shapes


def freeze_leaves(inner: optax.GradientTransformation, trainable: MaskOrFn) -> optax.GradientTransformation:
    """Run ``inner`` on the trainable leaves only; frozen leaves get a zero update and keep their state.

    Written by hand: ``optax.masked`` would change the state's tree structure with the mask, and must pass
    frozen leaves' updates through rather than zero them. Used only for ``train.reset_opt_on_freeze=False``
    (``jaxtl.optim.build``), with the same trainable mask the partition and the train step read: it stays beside
    ``optax.partition`` because a partition's state follows its labels, so a leaf changing from frozen to
    trainable would lose its moments there. Here the state always covers every leaf, so the
    set of frozen leaves can change between steps (PyTorch's ``requires_grad=False``: no step, state kept).
    Param-shaped subtrees of the state (moments, traces) are restored for frozen leaves; scalars such as the
    step count advance whenever at least one leaf trains, and not at all when every leaf is frozen.
    """

    def init_fn(params: Any) -> Any:
        return inner.init(params)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        mask = _resolve(trainable, updates)
        flags = [bool(m) for m in jax.tree_util.tree_leaves(mask)]
        if all(flags):
            return inner.update(updates, state, params)
        zero = lambda m, u: u if m else jnp.zeros_like(u)
        if not any(flags):
            return jax.tree_util.tree_map(zero, mask, updates), state
        new_updates, new_state = inner.update(jax.tree_util.tree_map(zero, mask, updates), state, params)
        new_updates = jax.tree_util.tree_map(zero, mask, new_updates)
        treedef = jax.tree_util.tree_structure(updates)
        shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(updates)]
        is_p = lambda node: _is_param_shaped(node, treedef, shapes)

        def keep(new: Any, old: Any) -> Any:
            if is_p(new):
                return jax.tree_util.tree_map(lambda m, n, o: n if m else o, mask, new, old)
            return new

        return new_updates, jax.tree_util.tree_map(keep, new_state, state, is_leaf=is_p)

    return optax.GradientTransformation(init_fn, update_fn)


def _maybe_freeze(tx: optax.GradientTransformation, trainable: MaskOrFn | None) -> optax.GradientTransformation:
    return tx if trainable is None else freeze_leaves(tx, trainable)


# ------------------------------------------------------------------------------------ fastai LAMB ratio


def scale_by_decayed_trust_ratio(
    learning_rate: jax.Array | float,
    weight_decay: float,
    wd_mask: MaskOrFn | None = None,
    max_ratio: float = LAMB_FASTAI_MAX_RATIO,
) -> optax.GradientTransformation:
    """fastai's LAMB trust ratio: ``r <- q r`` with ``q = min(||x (1 - lr wd)|| / ||r||, max_ratio)``.

    ``q = 1`` when either norm is 0. Written by hand: ``optax.scale_by_trust_ratio`` measures the raw
    parameters, has no cap, and would be applied after the decay term (the paper's ||r + λx||).
    ``wd`` is 0 on leaves outside ``wd_mask``.
    """

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("scale_by_decayed_trust_ratio needs the params passed to update()")
        mask = _resolve(wd_mask, updates) if wd_mask is not None else jax.tree_util.tree_map(lambda _: True, updates)

        def scale(r: jax.Array, p: jax.Array, m: bool) -> jax.Array:
            decayed = p * (1 - learning_rate * weight_decay) if m else p
            p_norm = jnp.linalg.norm(decayed.ravel())
            r_norm = jnp.linalg.norm(r.ravel())
            zero = (p_norm == 0) | (r_norm == 0)
            q = jnp.where(zero, 1.0, jnp.minimum(p_norm / jnp.where(zero, 1.0, r_norm), max_ratio))
            return r * q.astype(r.dtype)

        return jax.tree_util.tree_map(scale, updates, params, mask), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ------------------------------------------------------------------------------------------- factories
# Each ``_core`` builds the optimiser for fixed hyperparameter values; inject_hyperparams re-evaluates the
# scheduled ones (learning_rate, b1/momentum) every step. Everything else is static.

_STATIC = ("b2", "eps", "weight_decay", "wd_mask", "trainable")


def _adam_core(learning_rate: jax.Array, b1: jax.Array, b2: float, eps: float, weight_decay: float,
               wd_mask: MaskOrFn, trainable: MaskOrFn | None) -> optax.GradientTransformation:
    return _maybe_freeze(optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=0.0),
        optax.add_decayed_weights(weight_decay, mask=wd_mask),
        optax.scale_by_learning_rate(learning_rate),
    ), trainable)


def _lamb_core(learning_rate: jax.Array, b1: jax.Array, b2: float, eps: float, weight_decay: float,
               wd_mask: MaskOrFn, trainable: MaskOrFn | None) -> optax.GradientTransformation:
    return _maybe_freeze(optax.lamb(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=0.0,
                                    weight_decay=weight_decay, mask=wd_mask), trainable)


def _lamb_fastai_core(learning_rate: jax.Array, b1: jax.Array, b2: float, eps: float, weight_decay: float,
                      wd_mask: MaskOrFn, trainable: MaskOrFn | None) -> optax.GradientTransformation:
    return _maybe_freeze(optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=0.0),
        scale_by_decayed_trust_ratio(learning_rate, weight_decay, wd_mask),
        optax.add_decayed_weights(weight_decay, mask=wd_mask),
        optax.scale_by_learning_rate(learning_rate),
    ), trainable)


def _sgd_core(learning_rate: jax.Array, momentum: jax.Array, nesterov: bool, weight_decay: float,
              wd_mask: MaskOrFn, trainable: MaskOrFn | None) -> optax.GradientTransformation:
    return _maybe_freeze(optax.chain(
        optax.trace(decay=momentum, nesterov=nesterov),
        optax.add_decayed_weights(weight_decay, mask=wd_mask),
        optax.scale_by_learning_rate(learning_rate),
    ), trainable)


def _inject(core: Callable[..., optax.GradientTransformation], static: tuple[str, ...], **kw: Any) \
        -> optax.GradientTransformation:
    return optax.inject_hyperparams(core, static_args=static, hyperparam_dtype=jnp.float32)(**kw)


def adam(learning_rate: ScalarOrSchedule, b1: ScalarOrSchedule = 0.9, b2: float = 0.99, eps: float = 1e-5,
         weight_decay: float = 0.01, wd_mask: MaskOrFn | None = None, trainable: MaskOrFn | None = None) \
        -> optax.GradientTransformation:
    """fastai's Adam(W): ``p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``, ``m_hat = m / (1 - b1^t)``."""
    return _inject(_adam_core, _STATIC, learning_rate=_as_schedule(learning_rate), b1=_as_schedule(b1), b2=b2,
                   eps=eps, weight_decay=weight_decay, wd_mask=_default_wd_mask(wd_mask), trainable=trainable)


def lamb(learning_rate: ScalarOrSchedule, b1: ScalarOrSchedule = 0.9, b2: float = 0.999, eps: float = 1e-6,
         weight_decay: float = 0.0, wd_mask: MaskOrFn | None = None, trainable: MaskOrFn | None = None) \
        -> optax.GradientTransformation:
    """LAMB (You et al. 2020, Alg. 2; optax's defaults): ``x <- x - lr ||x|| / ||r + wd x|| (r + wd x)``."""
    return _inject(_lamb_core, _STATIC, learning_rate=_as_schedule(learning_rate), b1=_as_schedule(b1), b2=b2,
                   eps=eps, weight_decay=weight_decay, wd_mask=_default_wd_mask(wd_mask), trainable=trainable)


def lamb_fastai(learning_rate: ScalarOrSchedule, b1: ScalarOrSchedule = 0.9, b2: float = 0.99, eps: float = 1e-5,
                weight_decay: float = 0.0, wd_mask: MaskOrFn | None = None, trainable: MaskOrFn | None = None) \
        -> optax.GradientTransformation:
    """fastai's Lamb: ``x' = x (1 - lr wd)``, ``x <- x' - lr min(||x'|| / ||r||, 10) r`` (fastai's defaults)."""
    return _inject(_lamb_fastai_core, _STATIC, learning_rate=_as_schedule(learning_rate), b1=_as_schedule(b1),
                   b2=b2, eps=eps, weight_decay=weight_decay, wd_mask=_default_wd_mask(wd_mask),
                   trainable=trainable)


def sgd(learning_rate: ScalarOrSchedule, momentum: ScalarOrSchedule = 0.9, nesterov: bool = False,
        weight_decay: float = 0.0, wd_mask: MaskOrFn | None = None, trainable: MaskOrFn | None = None) \
        -> optax.GradientTransformation:
    """SGD: ``b <- mu b + g``; ``p <- p (1 - lr wd) - lr b`` (or ``- lr (g + mu b)`` with Nesterov)."""
    return _inject(_sgd_core, ("nesterov", "weight_decay", "wd_mask", "trainable"),
                   learning_rate=_as_schedule(learning_rate), momentum=_as_schedule(momentum), nesterov=nesterov,
                   weight_decay=weight_decay, wd_mask=_default_wd_mask(wd_mask), trainable=trainable)


# "adamw" is an alias: fastai's Adam already applies decoupled weight decay (Loshchilov & Hutter's AdamW).
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": adam, "adamw": adam, "lamb": lamb, "lamb_fastai": lamb_fastai, "sgd": sgd,
}


def restart_schedules(opt_state: Any) -> Any:
    """Set every schedule position in ``opt_state`` back to step 0, keeping moments and bias-correction counts.

    For carrying optimiser state into a new one-cycle phase (``train.reset_opt_on_freeze=False``).
    """
    kind = optax.InjectStatefulHyperparamsState

    def fix(node: Any) -> Any:
        if isinstance(node, kind):
            # jaxtl passes plain schedules, which inject_hyperparams wraps as WrappedSchedule: their only state
            # is their step count, so zeroing every leaf of ``hyperparams_states`` restarts them.
            return node._replace(count=jnp.zeros_like(node.count),
                                 hyperparams_states=jax.tree_util.tree_map(jnp.zeros_like, node.hyperparams_states),
                                 inner_state=restart_schedules(node.inner_state))
        return node

    return jax.tree_util.tree_map(fix, opt_state, is_leaf=lambda x: isinstance(x, kind))
