"""Gradient accumulation (``train.accum_steps``, ``optax.MultiSteps``): k batches of b make the update of one
batch of k*b (BatchNorm-free model), schedules count optimiser steps, frozen leaves stay frozen, the EMA moves on
optimiser steps only, and bad values are rejected."""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl import ema
from jaxtl.config import base_config, ignored_run_fields, validate
from jaxtl.train import TrainState, make_train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import TinyBundle  # noqa: E402


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(5)(x.reshape(len(x), -1))


def run(tx, batches, mask=None, accum_steps=1, average=None):
    model = Linear()
    params = model.init(jax.random.PRNGKey(0), batches[0]["image"][:1])["params"]
    mask = mask or jax.tree.map(lambda _: True, params)
    state = TrainState.create(params, {}, tx, jax.random.PRNGKey(1))
    if average is not None:
        state = state.replace(ema=ema.start({"params": params, "batch_stats": {}}))
    step = jax.jit(make_train_step(model, tx, mask, ema=average, accum_steps=accum_steps))
    states = []
    for b in batches:
        state, _ = step(state, b)
        states.append(state)
    return params, states


def data(n, b, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n * b, 4, 4, 3)).astype(np.float32)
    y = rng.integers(0, 5, n * b).astype(np.int32)
    return [{"image": jnp.asarray(x[i * b:(i + 1) * b]), "label": jnp.asarray(y[i * b:(i + 1) * b])} for i in range(n)]


def inner():
    return optax.adamw(optax.linear_schedule(1e-2, 1e-3, 4), b1=0.9, b2=0.99, weight_decay=0.1)


def test_four_batches_of_8_make_the_update_of_one_batch_of_32():
    small, big = data(8, 8), data(2, 32)
    _, acc = run(optax.MultiSteps(inner(), 4).gradient_transformation(), small, accum_steps=4)
    _, ref = run(inner(), big)
    for k_small, k_big in ((3, 0), (7, 1)):  # after each 4th small batch = after each big batch
        for a, r in zip(jax.tree.leaves(acc[k_small].params), jax.tree.leaves(ref[k_big].params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-5, atol=1e-6)
    # nothing moves between optimiser steps, and the schedule counts optimiser steps (2, not 8)
    p0 = jax.tree.leaves(acc[0].params)
    for s in acc[1:3]:
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s.params), p0, strict=True))
    assert int(acc[-1].opt_state.gradient_step) == 2
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(acc[3].params), p0, strict=True))


def test_frozen_leaves_stay_frozen_and_the_ema_moves_on_optimiser_steps_only():
    batches = data(6, 4)
    mask = {"Dense_0": {"kernel": True, "bias": False}}
    tx = optax.MultiSteps(optax.adam(1e-2), 3).gradient_transformation()
    start, states = run(tx, batches, mask=mask, accum_steps=3, average=ema.Ema(0.5))
    assert all(np.array_equal(s.params["Dense_0"]["bias"], start["Dense_0"]["bias"]) for s in states)
    e = [jax.device_get(s.ema["params"]["Dense_0"]["kernel"]) for s in states]
    w = [jax.device_get(s.params["Dense_0"]["kernel"]) for s in states]
    k0 = np.asarray(start["Dense_0"]["kernel"])
    assert np.array_equal(e[0], k0) and np.array_equal(e[1], k0)  # micro-steps 1, 2: no update yet
    np.testing.assert_array_equal(e[2], w[2])  # optimiser update 1: timm's first update copies
    assert np.array_equal(e[3], e[2]) and np.array_equal(e[4], e[2])
    np.testing.assert_allclose(e[5], 0.5 * e[2] + 0.5 * w[5], rtol=1e-6)  # update 2: decay 0.5


def test_learner_schedules_count_optimiser_steps(tmp_path):
    from jaxtl.learner import Learner
    from jaxtl.models import create_model

    model = create_model("resnet18", 3)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))
    c = base_config()
    c.model.arch, c.train.batch_size, c.train.accum_steps = "resnet18", 4, 3
    learn = Learner(model, v, TinyBundle(n_train=12), c)  # 3 batches per epoch
    learn.fit_one_cycle(2, 1e-3)
    assert learn.global_step == 6  # batches
    assert int(learn.state.opt_state.gradient_step) == 2  # optimiser steps: the one-cycle ran over 2
    c.train.accum_steps = 7
    with pytest.raises(ValueError, match=r"train\.accum_steps=7 is more than the 6 step"):
        Learner(model, v, TinyBundle(n_train=12), c).fit_one_cycle(2, 1e-3)


def test_accum_steps_zero_is_rejected_and_lr_find_warns():
    c = base_config()
    c.data.source, c.train.accum_steps = "demo", 0
    with pytest.raises(ValueError, match=r"train\.accum_steps must be >= 1"):
        validate(c)
    c.train.accum_steps, c.train.recipe = 4, "lr_find"
    assert any("train.accum_steps=4" in m and "lr_find" in m for m in ignored_run_fields(c))
