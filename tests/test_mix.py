"""Label smoothing, MixUp and CutMix (jaxtl/mix.py) against the NumPy transcriptions of fastai's and timm's
definitions (jaxtl/reference/regularise.py), in the train step, and their config fields."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl import fit, mix
from jaxtl.config import base_config, ignored_run_fields, validate
from jaxtl.reference import regularise as ref
from jaxtl.train import TrainState, make_train_step


def test_fixed_draws_match_timm_and_fastai_within_1e_6():
    for q, (_, rel) in ref.case_diffs().items():
        assert rel <= ref.TOL, q


def test_the_checks_fail_when_the_feature_is_wrong(monkeypatch):
    # CutMix without timm's area correction of lambda
    real = mix.mix

    def no_correction(images, d):
        out, lam = real(images, d)
        return out, jnp.where(d.apply, d.lam, 1.0)

    monkeypatch.setattr(mix, "mix", no_correction)
    assert ref.case_diffs()["λ"][1] > 1e-2 and ref.case_diffs()["loss"][1] > 1e-3
    monkeypatch.undo()
    # label smoothing off in jaxtl while the reference smooths
    real_loss = mix.regularised_loss
    monkeypatch.setattr(mix, "regularised_loss", lambda lg, y, lam, reg: real_loss(lg, y, lam, mix.Regularise(
        0.0, reg.mixup_alpha, reg.cutmix_alpha)))
    assert ref.case_diffs()["label smoothing loss"][1] > 1e-2
    monkeypatch.undo()
    # CutMix that pastes nothing
    monkeypatch.setattr(mix, "mix", lambda images, d: (jnp.where(d.apply & d.cutmix, images, real(images, d)[0]),
                                                       real(images, d)[1]))
    assert ref.case_diffs()["images"][1] > 1e-2


def test_draw_statistics_match_the_distributions():
    for q, (got, want) in ref.draw_stats(n=8000, seed=1).items():
        assert abs(got - want) <= ref.STAT_TOL * abs(want) + 0.02, q  # 8000 draws: a little more slack
    # a single method: its alpha alone; the switch is not drawn
    d = jax.vmap(lambda k: mix.draws(k, 8, 8, mix.Regularise(cutmix_alpha=1.0)))(jax.random.split(
        jax.random.PRNGKey(0), 500))
    assert bool(np.all(np.asarray(d.cutmix))) and bool(np.all(np.asarray(d.apply)))
    d = jax.vmap(lambda k: mix.draws(k, 8, 8, mix.Regularise(mixup_alpha=0.2, mix_prob=0.0)))(jax.random.split(
        jax.random.PRNGKey(0), 500))
    assert not np.any(np.asarray(d.cutmix)) and not np.any(np.asarray(d.apply))


class Linear(nn.Module):
    """logits = flatten(x) @ W + b (no BatchNorm): the reference computes it in NumPy."""

    classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.classes)(x.reshape(len(x), -1))


def step_loss(reg, x, y, seed=3, step=0):
    model = Linear()
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    tx = optax.sgd(0.0)
    state = TrainState.create(params, {}, tx, jax.random.PRNGKey(seed), step=step)
    _, out = jax.jit(make_train_step(model, tx, jax.tree.map(lambda _: True, params), regularise=reg))(
        state, {"image": jnp.asarray(x), "label": jnp.asarray(y)})
    return float(out["loss"]), params, state


@pytest.mark.parametrize("reg", [mix.Regularise(0.1), mix.Regularise(0.0, mixup_alpha=0.4),
                                 mix.Regularise(0.1, cutmix_alpha=1.0), mix.Regularise(0.2, 0.4, 1.0, 0.7, 0.5)])
def test_train_step_loss_is_timms_on_the_steps_own_draws(reg):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 10, 9, 3)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    for step in (0, 5):
        got, params, state = step_loss(reg, x, y, step=step)
        key = jax.random.fold_in(state.rng, state.step)  # the step's key (dropout's); mixing folds in MIX_STREAM
        d = mix.draws(jax.random.fold_in(key, mix.MIX_STREAM), 10, 9, reg)
        xr, targets, _ = ref.timm_mixup(x, y, 4, applied=bool(d.apply) and reg.mixes, use_cutmix=bool(d.cutmix),
                                        lam=float(d.lam), cy=int(d.cy), cx=int(d.cx), smoothing=reg.label_smoothing)
        w, b = np.asarray(params["Dense_0"]["kernel"], np.float64), np.asarray(params["Dense_0"]["bias"], np.float64)
        want = ref.soft_cross_entropy(xr.reshape(6, -1) @ w + b, targets)
        plain = ref.soft_cross_entropy(x.reshape(6, -1) @ w + b, np.eye(4)[y])
        assert got == pytest.approx(want, rel=1e-5)
        assert abs(want - plain) > 1e-3  # the regularisation changes the loss: this test would see it missing


def test_inactive_regularisation_is_the_plain_step_bit_for_bit():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 6, 6, 3)).astype(np.float32), rng.integers(0, 4, 4)
    plain = step_loss(None, x, y)[0]
    assert plain == step_loss(mix.Regularise(), x, y)[0]
    assert plain == step_loss(mix.Regularise(mixup_alpha=1.0, mix_prob=0.0), x, y)[0]  # never mixes
    assert plain != step_loss(mix.Regularise(0.1), x, y)[0]
    assert not mix.Regularise(mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0).active


def test_mix_off_epoch_switches_to_the_step_without_mixing(monkeypatch):
    built = []

    def fake_make_train_step(model, tx, mask, axis_name=None, transform=None, regularise=None, ema=None,
                             accum_steps=1):
        built.append(regularise)
        return lambda state, batch: (state, regularise)

    monkeypatch.setattr(fit, "make_train_step", fake_make_train_step)
    c = base_config()
    c.train.mixup_alpha, c.train.label_smoothing, c.train.mix_off_epoch = 0.4, 0.1, 2
    learn = types.SimpleNamespace(config=c, model=None, transform=None, data_epoch=0,
                                  par=types.SimpleNamespace(model_axis_name=None, train_step=lambda f: f))
    step = fit.train_step(learn, None, None)
    used = []
    for e in range(4):
        learn.data_epoch = e
        used.append(step(None, None)[1])
    assert used[0] == used[1] == mix.Regularise(0.1, 0.4) and used[2] == used[3] == mix.Regularise(0.1)
    c.train.mix_off_epoch = 0  # mix throughout: one step
    built.clear()
    fit.train_step(learn, None, None)
    assert built == [mix.Regularise(0.1, 0.4)]


@pytest.mark.parametrize("field,value,rule", [
    ("mixup_alpha", -0.1, ">= 0"), ("cutmix_alpha", -1.0, ">= 0"), ("label_smoothing", 1.0, "in [0, 1)"),
    ("mix_prob", 1.5, "in [0, 1]"), ("mix_switch_prob", -0.5, "in [0, 1]"), ("mix_off_epoch", -1, ">= 0")])
def test_bad_values_are_rejected_naming_the_field(field, value, rule):
    c = base_config()
    c.data.source = "demo"
    c.train[field] = value
    with pytest.raises(ValueError, match=rf"train\.{field} must be {rule}".replace("[", r"\[").replace(")", r"\)")
                       .replace("]", r"\]")):
        validate(c)


def test_mix_fields_without_an_alpha_warn():
    c = base_config()
    c.train.mix_prob, c.train.mix_off_epoch = 0.5, 3
    msgs = ignored_run_fields(c)
    assert any("train.mix_prob=0.5" in m for m in msgs) and any("train.mix_off_epoch=3" in m for m in msgs)
    c.train.mixup_alpha, c.train.mix_switch_prob = 0.4, 0.2
    msgs = ignored_run_fields(c)
    assert [m for m in msgs if "mix_" in m] == [m for m in msgs if "train.mix_switch_prob=0.2" in m] != []
    c.train.cutmix_alpha = 1.0
    assert not [m for m in ignored_run_fields(c) if "mix" in m]
