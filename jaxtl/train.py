"""The training state and the pure train / eval / predict step builders.

Everything here is a pure function of pytrees, meant to be wrapped by ``jaxtl.parallel`` (``jax.jit`` over a
device mesh, or ``jax.pmap``). No I/O, no Python side effects inside the steps.

Freezing (fastai semantics): the ``trainable`` mask (a pytree of Python bools shaped like the parameters, see
``jaxtl.groups.trainable_mask``) is static. Gradients are taken only with respect to the trainable leaves, so
XLA never computes weight gradients for frozen convolutions; frozen leaves are copied through unchanged
(bit-identical) whatever the optimiser does. BatchNorm layers always run in train mode during training, frozen
or not, so their running statistics keep moving as in fastai (whose ``BnFreeze`` callback is opt-in). When no
body parameter is trainable (``freeze()`` with ``train_bn=False``) the body runs forward under
``stop_gradient`` and the backward pass covers the head only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxtl import metrics
from jaxtl.device_augment import BatchTransform
from jaxtl.ema import Ema
from jaxtl.mix import Regularise, regularised_batch, regularised_loss

PyTree = Any
Batch = dict[str, jax.Array]
# train.precision -> the model's compute dtype ("auto": see compute_dtype). Parameters, optimiser state, BatchNorm
# statistics and the loss stay float32 whatever the compute dtype.
PRECISIONS = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}
BF16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")  # where "auto" computes in bfloat16 (on CPU bf16 measured 4-6x slower)


def compute_dtype(precision: str, backend: str | None = None) -> Any:
    """``train.precision`` -> the model's compute dtype: ``"auto"`` is bfloat16 on a GPU / TPU backend and float32
    on the CPU (``backend`` defaults to ``jax.default_backend()``)."""
    if precision == "auto":
        backend = jax.default_backend() if backend is None else backend
        return jnp.bfloat16 if backend in BF16_BACKENDS else jnp.float32
    return PRECISIONS[precision]


class TrainState(struct.PyTreeNode):
    """Everything a train step reads and writes.

    ``step`` counts optimiser steps over the whole life of the Learner (it never resets between phases); the
    dropout key of a step is ``fold_in(rng, step)``. Schedules read their own count from ``opt_state``. ``ema``:
    the weights' moving average (``jaxtl.ema``) when on.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array
    ema: PyTree = None  # {"params", "batch_stats"} averaged by jaxtl.ema (train.ema_decay > 0), else None

    @classmethod
    def create(cls, params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
               step: int = 0) -> TrainState:
        """A fresh state with ``tx.init(params)`` as optimiser state."""
        return cls(step=jnp.asarray(step, jnp.int32), params=params, batch_stats=batch_stats,
                   opt_state=tx.init(params), rng=jnp.asarray(rng))

    @property
    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy in float32 (fastai's ``CrossEntropyLossFlat`` before the mean)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _flat_mask(trainable: PyTree, params: PyTree) -> tuple[list[bool], Any]:
    treedef = jax.tree_util.tree_structure(params)
    mask_leaves = treedef.flatten_up_to(trainable)
    return [bool(m) for m in mask_leaves], treedef


def body_is_frozen(trainable: PyTree) -> bool:
    """True when no leaf under ``params["body"]`` is trainable."""
    if not isinstance(trainable, dict) or "body" not in trainable:
        return False
    return not any(bool(m) for m in jax.tree_util.tree_leaves(trainable["body"]))


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    trainable: PyTree,
    *,
    axis_name: str | None = None,
    split_frozen_body: bool = True,
    transform: BatchTransform | None = None,
    regularise: Regularise | None = None,
    ema: Ema | None = None,
    accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build ``step(state, batch) -> (state, {"loss": mean loss})``.

    ``trainable``: bools shaped like ``state.params`` (static). ``axis_name``: set under ``pmap`` to average the
    gradients and the loss over devices (BatchNorm syncs through the model's own ``axis_name``). Under sharded
    ``jit`` the mean over the global batch is already global and no collective is written here.
    ``split_frozen_body``: when the body has no trainable leaf, run it as a separate forward pass under
    ``stop_gradient`` (no backward pass through it). ``transform``: the batch's images -> model input on the device
    (``BatchTransform.train``: fastai's batch augmentation + normalisation of uint8 batches); None: the images as
    they are. ``regularise``: label smoothing / MixUp / CutMix (``jaxtl.mix``) on the model input and the loss,
    drawn from the step's key; None or inactive: the plain cross-entropy. ``ema``: update ``state.ema`` (params
    and BatchNorm statistics) after the optimiser step (``jaxtl.ema``). ``accum_steps`` = k > 1: ``tx`` is an
    ``optax.MultiSteps`` (``train.accum_steps``) whose update is zero until the k-th step; the EMA then moves only
    on those steps, as update number ``(step + 1) // k``.
    """
    frozen_body = split_frozen_body and body_is_frozen(trainable)
    reg = regularise if regularise is not None and regularise.active else None

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        mask, treedef = _flat_mask(trainable, state.params)
        flat = treedef.flatten_up_to(state.params)
        train_leaves = [p for p, m in zip(flat, mask, strict=True) if m]

        def merge(new_train: list[jax.Array], fill: list[jax.Array]) -> PyTree:
            it = iter(new_train)
            return treedef.unflatten([next(it) if m else f for m, f in zip(mask, fill, strict=True)])

        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        images = batch["image"] if transform is None else transform.train(batch)
        labels = batch["label"]
        if reg is not None:
            images, lam = regularised_batch(rng, images, reg)

        if frozen_body:
            feats, mut = model.apply(state.variables, images, True, method="features", mutable=["batch_stats"])
            inputs, method, batch_stats = jax.lax.stop_gradient(feats), "classify", mut["batch_stats"]
        else:
            inputs, method, batch_stats = images, None, state.batch_stats

        def loss_fn(leaves: list[jax.Array]) -> tuple[jax.Array, PyTree]:
            params = merge(leaves, flat)
            logits, mut = model.apply({"params": params, "batch_stats": batch_stats}, inputs, True,
                                      method=method, mutable=["batch_stats"], rngs={"dropout": rng})
            loss = cross_entropy(logits, labels).mean() if reg is None else \
                regularised_loss(logits, labels, lam, reg)
            return loss, mut["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_leaves)
        if axis_name is not None:
            grads, loss = jax.lax.pmean((grads, loss), axis_name)
        full_grads = merge(grads, [jnp.zeros_like(p) for p in flat])
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        stepped = treedef.flatten_up_to(optax.apply_updates(state.params, updates))
        # frozen leaves: the old arrays, untouched (bit-identical whatever the optimiser returned for them)
        params = merge([s for s, m in zip(stepped, mask, strict=True) if m], flat)
        average = state.ema
        if ema is not None:
            if average is None:
                raise ValueError("train.ema_decay > 0 but the TrainState has no ema (start it with jaxtl.ema.start)")
            weights = {"params": params, "batch_stats": new_stats}
            if accum_steps > 1:  # only when MultiSteps made an update (its micro-step wrapped to 0)
                moved = ema.update(average, weights, (state.step + 1) // accum_steps)
                average = jax.tree.map(lambda m, a: jnp.where(opt_state.mini_step == 0, m, a), moved, average)
            else:
                average = ema.update(average, weights, state.step + 1)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state,
                                  ema=average)
        return new_state, {"loss": loss}

    return step


def make_eval_step(
    model: nn.Module, *, axis_name: str | None = None, transform: BatchTransform | None = None
) -> Callable[[dict[str, PyTree], Batch], dict[str, jax.Array]]:
    """Build ``step(variables, batch) -> sums`` (see ``jaxtl.metrics.eval_sums``), masked by ``batch["mask"]``;
    ``transform.eval`` (if given) turns the images into model input (uint8 -> normalised) on the device.

    Under ``pmap`` (``axis_name`` set) the sums are ``psum``-ed over devices.
    """

    def step(variables: dict[str, PyTree], batch: Batch) -> dict[str, jax.Array]:
        images = batch["image"] if transform is None else transform.eval(batch["image"])
        logits = model.apply(variables, images, False)
        mask = batch.get("mask")
        if mask is None:
            mask = jnp.ones(batch["label"].shape, bool)
        sums = metrics.eval_sums(logits, batch["label"], mask)
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return step


def make_predict_step(model: nn.Module, transform: BatchTransform | None = None
                      ) -> Callable[[dict[str, PyTree], jax.Array], jax.Array]:
    """Build ``step(variables, images) -> softmax probabilities`` (float32, eval mode); ``transform.eval`` as in
    :func:`make_eval_step`."""

    def step(variables: dict[str, PyTree], images: jax.Array) -> jax.Array:
        images = images if transform is None else transform.eval(images)
        return jax.nn.softmax(model.apply(variables, images, False).astype(jnp.float32), axis=-1)

    return step


def make_features_step(model: nn.Module, transform: BatchTransform | None = None
                       ) -> Callable[[dict[str, PyTree], jax.Array], jax.Array]:
    """Build ``step(variables, images) -> pooled features`` (float32, eval mode, ``ResNet.pooled``;
    ``transform.eval`` as in :func:`make_eval_step`): the linear probe's features (``jaxtl.probe``)."""

    def step(variables: dict[str, PyTree], images: jax.Array) -> jax.Array:
        images = images if transform is None else transform.eval(images)
        return model.apply(variables, images, False, method="pooled").astype(jnp.float32)

    return step


def make_tta_step(model: nn.Module, transform: BatchTransform | None = None
                  ) -> Callable[[dict[str, PyTree], Batch], jax.Array]:
    """Build ``step(variables, batch) -> softmax probabilities`` (float32, eval mode) of a batch *with its
    training transforms* (``transform.train``: uint8 + the draws): one pass of test-time augmentation."""

    def step(variables: dict[str, PyTree], batch: Batch) -> jax.Array:
        images = batch["image"] if transform is None else transform.train(batch)
        return jax.nn.softmax(model.apply(variables, images, False).astype(jnp.float32), axis=-1)

    return step


def enable_compilation_cache(cache_dir: str = "") -> Path:
    """Turn on JAX's persistent compilation cache in ``cache_dir`` ('' = ``~/.cache/jaxtl/xla``;
    ``config.train.compile_cache_dir``). Later runs with the same model, batch shape and phase skip XLA
    compilation. Returns the directory."""
    path = Path(os.path.expanduser(cache_dir or "~/.cache/jaxtl/xla"))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small programs add up at start-up
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
