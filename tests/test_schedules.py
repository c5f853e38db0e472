"""One-cycle, fine_tune's phases and lr_find's rule against float64 transcriptions of fastai's code."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl import metrics, schedules
from jaxtl.reference import schedules as ref

RTOL = 1e-6  # one float32 evaluation; relative to each step's own value (the lr tail is lr_max/1e5)


@pytest.mark.parametrize("n, pct, div, div_final", [(1000, 0.25, 25.0, 1e5), (37, 0.3, 5.0, 1e5),
                                                    (120, 0.99, 25.0, 1e5), (10, 0.0, 25.0, 1e4),
                                                    (9, 1.0, 10.0, 1e5)])
def test_one_cycle_every_step(n, pct, div, div_final):
    lr_max = [1e-5, 1e-4, 1e-3]
    lr_s, mom_s = schedules.one_cycle(n, lr_max, div=div, div_final=div_final, pct_start=pct)
    got_lr = np.asarray(jax.jit(jax.vmap(lr_s))(jnp.arange(n)), np.float64)
    got_mom = np.asarray(jax.jit(jax.vmap(mom_s))(jnp.arange(n)), np.float64)
    assert got_lr.shape == (n, 3) and got_mom.shape == (n,)
    for g, lm in enumerate(lr_max):
        want_lr, want_mom = ref.one_cycle_values(n, lm, div, div_final, pct, (0.95, 0.85, 0.95))
        np.testing.assert_allclose(got_lr[:, g], want_lr, rtol=RTOL, atol=0)
        np.testing.assert_allclose(got_mom, want_mom, rtol=RTOL, atol=0)


def test_one_cycle_landmarks_and_scalar():
    lr_s, mom_s = schedules.one_cycle(100, 1e-3, pct_start=0.25)
    assert float(lr_s(0)) == pytest.approx(1e-3 / 25, rel=1e-6)
    assert float(lr_s(25)) == pytest.approx(1e-3, rel=1e-6)
    assert float(mom_s(0)) == pytest.approx(0.95, rel=1e-7) and float(mom_s(25)) == pytest.approx(0.85, rel=1e-7)
    assert float(lr_s(100)) == pytest.approx(1e-8, rel=1e-6)  # pos = 1: lr_max / div_final
    assert float(lr_s(500)) == float(lr_s(100))  # clipped past the end
    assert lr_s(jnp.asarray(3)).shape == ()


def test_one_cycle_is_not_optax_cosine_onecycle():
    """fastai's one-cycle differs from optax.cosine_onecycle_schedule (different final value and warm-up start)."""
    import optax

    lr_s, _ = schedules.one_cycle(100, 1e-3, pct_start=0.25)
    ox = optax.cosine_onecycle_schedule(100, 1e-3, pct_start=0.25, div_factor=25.0, final_div_factor=1e5)
    diffs = [abs(float(lr_s(t)) - float(ox(t))) / float(lr_s(t)) for t in range(1, 100)]
    assert max(diffs) > 1e-3


def test_split_schedule():
    lr_s, _ = schedules.one_cycle(50, [1.0, 2.0, 3.0])
    parts = schedules.split_schedule(lr_s, 3)
    for t in (0, 7, 49):
        np.testing.assert_array_equal([float(p(t)) for p in parts], np.asarray(lr_s(t)))


@pytest.mark.parametrize("epochs, base_lr, freeze_epochs, lr_mult, pct, div",
                         [(1, 2e-3, 1, 100, 0.3, 5.0), (4, 1e-3, 2, 10, 0.25, 25.0), (3, 5e-3, 1, 1000, 0.5, 8.0)])
def test_fine_tune_plan_equals_fastai(epochs, base_lr, freeze_epochs, lr_mult, pct, div):
    got = schedules.fine_tune_plan(epochs, base_lr, freeze_epochs, lr_mult, pct, div)
    want = ref.fine_tune_calls(epochs, base_lr, freeze_epochs, lr_mult, pct, div)
    assert len(got) == 2
    for phase, call in zip(got, want, strict=True):
        assert phase.n_frozen == (2 if call["freeze_to"] == -1 else 0)
        assert phase.epochs == call["n_epoch"] and phase.pct_start == call["pct_start"] and phase.div == call["div"]
        np.testing.assert_allclose(phase.lrs, call["lrs"], rtol=1e-15, atol=0)
    # the default recipe, spelled out: frozen at slice(2e-3) -> [2e-4, 2e-4, 2e-3]; then even_mults(1e-5, 1e-3)
    p1, p2 = schedules.fine_tune_plan(1)
    assert p1 == schedules.Phase(2, 1, (2e-4, 2e-4, 2e-3), 0.99, 25.0)
    np.testing.assert_allclose(p2.lrs, [1e-5, 1e-4, 1e-3], rtol=1e-14)


def test_fine_tune_plan_without_frozen_phase():
    (phase,) = schedules.fine_tune_plan(2, base_lr=2e-3, freeze_epochs=0)
    np.testing.assert_allclose(phase.lrs, ref.even_mults(1e-5, 1e-3, 3), rtol=1e-15)  # base_lr still halved


def test_lr_find_schedule_and_smoothing():
    sweep = schedules.lr_find_schedule(1e-7, 10.0, 100)
    got = np.asarray(jax.vmap(sweep)(jnp.arange(101)), np.float64)
    want = [ref.sched_exp(1e-7, 10.0, t / 100) for t in range(101)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] == pytest.approx(1e-7, rel=1e-6) and got[100] == pytest.approx(10.0, rel=1e-5)
    losses = list(np.random.default_rng(0).uniform(0.5, 3.0, 50))
    smoother = metrics.SmoothLoss()  # the one smoother: train_loss and lr_find both use it
    np.testing.assert_allclose([smoother.update(v) for v in losses], ref.smooth_losses(losses), rtol=1e-13)
    assert schedules.lr_find_diverged(4.1, 1.0) and not schedules.lr_find_diverged(3.9, 1.0)
    assert not schedules.lr_find_diverged(float("nan"), 1.0)  # fastai does not stop on NaN


def _lr_find_curve(rng, n):
    x = np.linspace(0, 1, n)
    return 2.3 - 1.5 * np.exp(-((x - 0.6) / 0.2) ** 2) + np.exp(12 * (x - 0.9)) + 0.05 * rng.standard_normal(n)


def test_valley_equals_fastai_loop():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 60))
        losses = _lr_find_curve(rng, n) if trial % 3 == 0 else rng.integers(0, 6, n).astype(float)
        lrs = np.geomspace(1e-7, 10, n)
        assert schedules.valley(lrs, losses) == ref.valley(list(lrs), list(losses)), (trial, list(losses))


def test_valley_hand_case():
    # longest strictly decreasing run: 5 > 4 > 3 > 2 > 1 at indices 1..5 -> lds[5] = 5, max_start = 0,
    # sections = 5/3 -> idx = 0 + 1 + 0 = 1
    losses = [1.0, 5.0, 4.0, 3.0, 2.0, 1.0, 6.0]
    lrs = [10.0**k for k in range(-6, 1)]
    assert schedules.valley(lrs, losses) == (1e-5, 1)


def test_suggest_lr_with_nan_like_fastai():
    rng = np.random.default_rng(3)
    lrs = list(np.geomspace(1e-7, 10, 100))
    losses = ref.smooth_losses(list(_lr_find_curve(rng, 100)))
    losses[80:] = [math.nan] * 20
    got = schedules.suggest_lr(lrs, losses, num_it=100)
    want = ref.lr_find_suggestion(lrs, losses, num_it=100)
    assert got == want
    assert 10 <= got[1] < 80 and got[0] == lrs[got[1]]
