"""``jaxtl.device_augment`` (pure JAX, on the accelerator) against the TF host augmentation it replaces.

The host draws the parameters (``augment.batch_aug_params``); applying them with ``device_augment`` must give
``augment.normalize(augment.augment_batch(x / 255, seed))`` to float32 rounding. Tolerance: 1e-5 max abs error,
on [0, 1] images and on normalised outputs (measured: ~1.2e-7 and ~4.8e-7 on this CPU).

The two can only differ by how the compilers round (XLA may contract ``a * b + c`` into an FMA, TF's kernel
does not): a 1-ulp change of a source coordinate moves the output by up to ``ulp(|coord|)`` times the local
image gradient, so the fixtures keep coordinates within a few image sizes and ``proj = c6 x + c7 y + 1`` well
away from 0 (near a singular projection both results are rounding noise).
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from jaxtl import device_augment as da
from jaxtl.data import augment
from jaxtl.data.augment import AugParams

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TOL = 1e-5
SEEDS = [(0, 0), (1, 2), (123, 456), (-7, 2**40)]

_projective = jax.jit(da.apply_projective)


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def _row(s=1.0, tx=0.0, ty=0.0, rot=0.0, persp=(0.0, 0.0)):
    """Projective row: output (x, y) -> (s R (x, y) + t) / (1 + persp . (x, y))."""
    c, sn = np.cos(rot), np.sin(rot)
    return [s * c, -s * sn, tx, s * sn, s * c, ty, persp[0], persp[1]]


# Transforms that sample far outside the image: strong zoom-out (every reflect case, several periods away),
# large translations both ways, a perspective row, and one with proj == 0 on column x = 4 (1 - 0.25 x).
FAR = np.array([_row(6, -80, -90), _row(9, 10, 5, 0.3), _row(1, 300, -250),
                _row(0.5, -200, 1000, 1.0, (0.001, -0.002)), _row(1.5, -10, 3, persp=(-0.25, 0.0))], np.float32)


def _tf_projective(img, t):
    return augment.apply_affine(tf.constant(img), tf.constant(t)).numpy()


def _far_params(size):
    """Affine draws sampling up to ~4 image sizes away (zoom out to 1/4, rotations to 45 degrees)."""
    return AugParams(size=size, max_rotate=45, min_zoom=0.25, max_zoom=3.0, max_warp=0.0, p_affine=1.0)


def _warp_params(size):
    """Strong but well-conditioned perspective warps (|proj| stays >~ 0.2; fastai's default 0.2 keeps > 0.4)."""
    return AugParams(size=size, max_rotate=20, max_warp=0.3, p_affine=1.0)


def _source_coords(t, h, w):
    """float64 input coordinates (before the reflect map) and proj of every output pixel, for coverage checks."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    t = t.astype(np.float64)[:, :, None, None]
    proj = t[:, 6] * xs + t[:, 7] * ys + 1
    with np.errstate(divide="ignore", invalid="ignore"):
        return (t[:, 0] * xs + t[:, 1] * ys + t[:, 2]) / proj, (t[:, 3] * xs + t[:, 4] * ys + t[:, 5]) / proj, proj


def test_far_fixture_covers_every_reflect_branch():
    """The FAR rows reach each case of MapCoordinate<FILL_REFLECT> and the proj == 0 rule, on both axes."""
    for h, w in ((32, 32), (24, 40)):
        in_x, in_y, proj = _source_coords(FAR, h, w)
        assert (proj == 0).any()
        ok = proj != 0
        for c, n in ((in_x[ok], w), (in_y[ok], h)):
            assert (c < -2 * n).any() and ((c > -2 * n) & (c < -n)).any() and ((c > -n) & (c < 0)).any()
            assert ((c > n - 1) & (c < n)).any() and ((c >= n) & (c < 2 * n)).any() and (c >= 2 * n).any()
            assert ((c >= 0) & (c <= n - 1)).any()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(4, 32, 32, 3), (4, 24, 40, 3)])
def test_apply_projective_matches_tf(seed, shape):
    img = _images(shape, seed=abs(seed[0]))
    key = tf.constant(seed, tf.int64)
    for t in [augment.affine_transforms(key, shape[0], shape[1], pf(shape[1])).numpy()
              for pf in (lambda s: AugParams(size=s), _far_params, _warp_params)] + [FAR]:
        img_t = np.resize(img, (len(t), *shape[1:]))
        ours = np.asarray(_projective(jnp.asarray(img_t), jnp.asarray(t)))
        np.testing.assert_allclose(ours, _tf_projective(img_t, t), rtol=0, atol=TOL)


def test_apply_projective_proj_zero_reads_fill_and_single_row_broadcasts():
    img = _images((2, 16, 16, 3), seed=3)
    t = np.array([_row(1.0, 0.0, 0.0, persp=(-0.25, 0.0))], np.float32)  # proj == 0 on column 4
    ours = np.asarray(_projective(jnp.asarray(img), jnp.asarray(t)))
    assert (ours[:, :, 4] == 0).all()
    np.testing.assert_allclose(ours, _tf_projective(img, t), rtol=0, atol=TOL)


def test_apply_projective_224():
    img = _images((4, 224, 224, 3), seed=5)
    t = np.concatenate([augment.affine_transforms(tf.constant([11, 12], tf.int64), 2, 224, pf(224)).numpy()
                        for pf in (_far_params, _warp_params)])
    ours = np.asarray(_projective(jnp.asarray(img), jnp.asarray(t)))
    np.testing.assert_allclose(ours, _tf_projective(img, t), rtol=0, atol=TOL)


def test_reflect_is_not_clamp(monkeypatch):
    """On the FAR fixture, replacing the reflect map by clamping (TF's NEAREST fill) changes the output a lot."""
    img = _images((len(FAR), 32, 32, 3), seed=4)
    ref = _tf_projective(img, FAR)
    good = np.asarray(da.apply_projective(jnp.asarray(img), jnp.asarray(FAR)))
    monkeypatch.setattr(da, "_reflect", lambda c, n: jnp.clip(c, 0.0, n - 1.0))
    clamped = np.asarray(da.apply_projective(jnp.asarray(img), jnp.asarray(FAR)))
    assert np.abs(good - ref).max() <= TOL
    assert np.abs(clamped - ref).max() > 0.5 and (np.abs(clamped - ref) > 1e-3).mean() > 0.3


def test_apply_lighting_and_flip_match_tf():
    x = _images((6, 8, 8, 3), seed=6)
    x[0, 0, 0] = [0.0, 1.0, 0.5]
    bright, contrast = augment.lighting_draws(tf.constant([3, 3], tf.int64), 6, 0.5, 1.0)
    ref = augment.apply_lighting(tf.constant(x), bright, contrast).numpy()
    ours = np.asarray(jax.jit(da.apply_lighting)(jnp.asarray(x), jnp.asarray(bright), jnp.asarray(contrast)))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
    do = augment.flip_coins(tf.constant([9, 9], tf.int64), 6)
    ref = augment.flip_batch(tf.constant(x), tf.constant([9, 9], tf.int64)).numpy()
    assert 0 < do.numpy().sum() < 6
    np.testing.assert_array_equal(np.asarray(da.flip(jnp.asarray(x), jnp.asarray(do))), ref)


CASES = {
    "defaults": AugParams(size=32),
    "flip_only": AugParams(size=32, augment=False, flip=True),
    "no_augment": AugParams(size=32, augment=False, flip=False),
    "affine_no_lighting": AugParams(size=32, flip=False, max_lighting=0.0, max_warp=0.4),
}


def _host(x_u8, seed, p):
    x = tf.cast(tf.constant(x_u8), tf.float32) / 255.0
    return augment.normalize(augment.augment_batch(x, tf.constant(seed, tf.int64), p), MEAN, STD).numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_augment_batch_matches_host(case):
    p = CASES[case]
    flags = da.static_flags(p)
    assert flags == {"defaults": dict(has_affine=True, flip=False, lighting=True),
                     "flip_only": dict(has_affine=False, flip=True, lighting=False),
                     "no_augment": dict(has_affine=False, flip=False, lighting=False),
                     "affine_no_lighting": dict(has_affine=True, flip=False, lighting=False)}[case]
    jitted = jax.jit(da.augment_batch, static_argnames=("has_affine", "flip", "lighting", "mean", "std", "dtype"))
    x = np.random.default_rng(7).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    flipped = 0
    for seed in SEEDS:
        params = {k: jnp.asarray(v.numpy()) for k, v in augment.batch_aug_params(
            tf.constant(seed, tf.int64), 8, p).items()}
        flipped += int(params["flip"].sum())
        ref = _host(x, seed, p)
        ours = np.asarray(da.augment_batch(jnp.asarray(x), params, **flags, mean=MEAN, std=STD))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
        ours_jit = np.asarray(jitted(jnp.asarray(x), params, **flags, mean=MEAN, std=STD))
        np.testing.assert_allclose(ours_jit, ref, rtol=0, atol=TOL)
    assert (flipped > 0) == (case == "flip_only")  # the flip_batch path really ran (and only there)
    bf16 = da.augment_batch(jnp.asarray(x), params, **flags, mean=MEAN, std=STD, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == x.shape


@pytest.mark.parametrize("case", list(CASES))
def test_batch_aug_params_fixed_structure(case):
    p = CASES[case]
    d = {k: v.numpy() for k, v in augment.batch_aug_params(tf.constant([5, 6], tf.int64), tf.constant(5), p).items()}
    assert sorted(d) == ["affine", "flip", "lighting"]
    assert (d["affine"].shape, d["affine"].dtype) == ((5, 8), np.float32)
    assert (d["flip"].shape, d["flip"].dtype) == ((5,), np.bool_)
    assert (d["lighting"].shape, d["lighting"].dtype) == ((5, 2), np.float32)
    if not p.has_affine:
        assert (d["affine"] == [1, 0, 0, 0, 1, 0, 0, 0]).all()
    if p.has_affine or not p.flip:
        assert not d["flip"].any()
    if not (p.augment and p.max_lighting > 0):
        assert (d["lighting"] == [0.5, 1.0]).all()


def test_augment_batch_224_defaults():
    p = AugParams()
    x = np.random.default_rng(8).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    params = {k: jnp.asarray(v.numpy()) for k, v in augment.batch_aug_params(tf.constant([1, 2], tf.int64), 2,
                                                                             p).items()}
    ours = np.asarray(da.augment_batch(jnp.asarray(x), params, **da.static_flags(p), mean=MEAN, std=STD))
    np.testing.assert_allclose(ours, _host(x, (1, 2), p), rtol=0, atol=TOL)


def test_eval_batch_matches_host():
    x = np.random.default_rng(9).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    ref = augment.normalize(tf.cast(tf.constant(x), tf.float32) / 255.0, MEAN, STD).numpy()
    ours = np.asarray(jax.jit(da.eval_batch, static_argnums=(1, 2, 3))(jnp.asarray(x), MEAN, STD, jnp.float32))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_device_augment_imports_without_tensorflow():
    code = ("import sys; sys.modules['tensorflow'] = None; import jaxtl.device_augment; "
            "assert not any(m == 'jaxtl.data' or m.startswith('jaxtl.data.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
