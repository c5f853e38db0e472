"""fastai's batch augmentation applied on the accelerator, in pure ``jax.numpy`` (inside the jitted step).

The host draws the random parameters exactly as before (``jaxtl.data.augment.batch_aug_params``, stateless TF
draws from the batch seed, so batches stay reproducible and resumable); this module only does the per-pixel
work, transcribing the TF ops ``jaxtl.data.augment.augment_batch`` + ``normalize`` run on the host:

* :func:`apply_projective` -- ``tf.raw_ops.ImageProjectiveTransformV3(interpolation="BILINEAR",
  fill_mode="REFLECT", fill_value=0)``: bilinear projective resampling with reflection padding;
* :func:`flip` -- horizontal mirror of the chosen images;
* :func:`apply_lighting` -- fastai's Brightness then Contrast in logit space;
* :func:`normalize` -- ``(x - mean) * (1 / std)`` per channel;
* :func:`augment_batch` / :func:`eval_batch` -- the whole uint8 -> normalised-float batch transform;
* :class:`BatchTransform` -- what the train / eval / predict steps apply (``jaxtl.train``): the pipeline's
  uint8 batches (with their ``batch_aug_params`` draws under the keys ``"affine"``, ``"flip"``, ``"lighting"``)
  are augmented and normalised on the device; float images (already normalised, e.g. from ``preprocess_eval`` or
  a user's arrays) pass through unchanged.

All arithmetic is float32, in the same order as the TF kernels, so results agree with the host to float32
rounding (about 1e-6 on [0, 1] images). This module must not import TensorFlow or ``jaxtl.data``: it runs
inside jitted code and must import where TensorFlow is absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LOGIT_EPS = 1e-7  # fastai's logit() clamps to [1e-7, 1 - 1e-7] (same as jaxtl.data.augment.LOGIT_EPS)
F32 = jnp.float32


def static_flags(p: Any) -> dict[str, bool]:
    """The static switches of :func:`augment_batch` from an ``AugParams``-like object (duck-typed).

    ``has_affine = p.has_affine``; ``flip = p.flip and not p.has_affine`` (the flip-only path; with the affine
    path on, flipping is part of the projective rows); ``lighting = p.augment and p.max_lighting > 0``.
    These are exactly the branches ``jaxtl.data.augment.augment_batch`` takes.
    """
    has_affine = bool(p.has_affine)
    return {"has_affine": has_affine, "flip": bool(p.flip) and not has_affine,
            "lighting": bool(p.augment) and p.max_lighting > 0}


def _div(a: jax.Array, d: float) -> jax.Array:
    """``a / d`` as an IEEE float32 division, like TF's kernels (and unlike plain ``a / d`` under ``jit``).

    XLA rewrites a division by a constant or broadcast scalar into a multiplication by its rounded reciprocal,
    which is 1 ulp off for about half the inputs; that would move ``trunc(c / sz2)`` in :func:`_reflect` at
    period boundaries and ``u8 / 255`` off TF's values. ``a * 0 + d`` is an elementwise divisor XLA does not
    fold (``x * 0`` is not ``0`` for floats: inf/NaN), so the true division is kept.
    """
    return a / (a * 0.0 + d)


def _reflect(coord: jax.Array, length: int) -> jax.Array:
    """TF's ``MapCoordinate<FILL_REFLECT>``: reflect ``[abcd]`` to ``[dcba|abcd|dcba]``, then clamp.

    With ``n = length`` and ``sz2 = 2 n`` (``trunc`` = C++'s ``static_cast<DenseIndex>``, i.e. toward zero):

    * ``c < 0``: ``c' = sz2 * trunc(-c / sz2) + c``; then ``c' + sz2`` if ``c' < -n`` else ``-c' - 1``;
    * ``c > n - 1``: ``c' = c - sz2 * trunc(c / sz2)``; then ``sz2 - c' - 1`` if ``c' >= n`` else ``c'``;
    * otherwise ``c`` unchanged;

    and finally ``clamp(c', 0, n - 1)``. A side of length ``<= 1`` maps everything outside it to 0.
    """
    if length <= 1:
        return jnp.zeros_like(coord)
    n = float(length)
    sz2 = float(2 * length)
    neg = sz2 * jnp.trunc(_div(-coord, sz2)) + coord
    neg = jnp.where(neg < -n, neg + sz2, -neg - 1.0)
    pos = coord - sz2 * jnp.trunc(_div(coord, sz2))
    pos = jnp.where(pos >= n, (sz2 - pos) - 1.0, pos)
    out = jnp.where(coord < 0, neg, jnp.where(coord > n - 1.0, pos, coord))
    return jnp.clip(out, 0.0, n - 1.0)


def apply_projective(images: jax.Array, transforms: jax.Array) -> jax.Array:
    """Bilinear projective resampling with reflection padding, as TF's ``ImageProjectiveTransformV3``.

    ``images`` float ``(B, H, W, C)`` (computed in float32), ``transforms`` ``(B, 8)`` (or ``(1, 8)`` for all)
    rows ``c0..c7`` mapping output pixel ``(x, y)`` (x = column, y = row) to input coordinates:

    * ``proj = c6 x + c7 y + 1``; where ``proj == 0`` the output is the fill value 0 (all channels);
    * ``in_x = (c0 x + c1 y + c2) / proj``, ``in_y = (c3 x + c4 y + c5) / proj``;
    * each coordinate goes through the REFLECT map (:func:`_reflect`, against ``W`` and ``H``);
    * bilinear interpolation with ``x0 = floor(x)``, ``x1 = x0 + 1`` (same for y)::

          v0 = (x1 - x) f(y0, x0) + (x - x0) f(y0, x1)
          v1 = (x1 - x) f(y1, x0) + (x - x0) f(y1, x1)
          out = (y1 - y) v0 + (y - y0) v1

      where a neighbour outside the image reads the fill value 0 (after the reflect map and clamp this only
      happens with weight 0, on the last row/column).

    Returns float32 ``(B, H, W, C)``. Coordinates are assumed finite and below ~2^62 in magnitude (TF's
    float-to-int cast is undefined beyond that; the fastai transforms stay within a few image sizes).
    """
    images = images.astype(F32)
    b, h, w, c = images.shape
    t = jnp.broadcast_to(transforms.astype(F32), (b, 8))
    col = lambda i: t[:, i][:, None, None]
    ys = jnp.arange(h, dtype=F32)[None, :, None]
    xs = jnp.arange(w, dtype=F32)[None, None, :]
    proj = (col(6) * xs + col(7) * ys) + 1.0
    in_x = ((col(0) * xs + col(1) * ys) + col(2)) / proj
    in_y = ((col(3) * xs + col(4) * ys) + col(5)) / proj
    x = _reflect(in_x, w)
    y = _reflect(in_y, h)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    x1, y1 = x0 + 1.0, y0 + 1.0

    flat = images.reshape(b * h * w, c)
    base = (jnp.arange(b, dtype=jnp.int32) * (h * w))[:, None, None]

    def read(yi: jax.Array, xi: jax.Array) -> jax.Array:
        """``f(yi, xi)`` per output pixel, 0 where ``(yi, xi)`` lies outside the image. ``(B, H, W, C)``."""
        iy, ix = yi.astype(jnp.int32), xi.astype(jnp.int32)
        inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        idx = base + jnp.clip(iy, 0, h - 1) * w + jnp.clip(ix, 0, w - 1)
        return jnp.where(inside[..., None], flat[idx], 0.0)

    wx0, wx1 = (x1 - x)[..., None], (x - x0)[..., None]
    wy0, wy1 = (y1 - y)[..., None], (y - y0)[..., None]
    v0 = wx0 * read(y0, x0) + wx1 * read(y0, x1)
    v1 = wx0 * read(y1, x0) + wx1 * read(y1, x1)
    out = wy0 * v0 + wy1 * v1
    return jnp.where((proj == 0)[..., None], 0.0, out)


def apply_lighting(images: jax.Array, bright: jax.Array, contrast: jax.Array) -> jax.Array:
    """fastai's Brightness then Contrast: ``sigmoid((logit(x) + logit(bright)) * contrast)`` per image.

    ``x`` float ``(B, H, W, C)`` in [0, 1] is clipped to ``[1e-7, 1 - 1e-7]`` first (fastai's ``logit``);
    ``logit(v) = log(v / (1 - v))``; ``bright`` and ``contrast`` are ``(B,)``. Neutral draws are
    ``bright = 0.5``, ``contrast = 1``. Float32.
    """
    x = jnp.clip(images.astype(F32), LOGIT_EPS, 1 - LOGIT_EPS)
    logit = jnp.log(x / (1 - x))
    bright = bright.astype(F32)
    shift = jnp.log(bright / (1 - bright))[:, None, None, None]
    return jax.nn.sigmoid((logit + shift) * contrast.astype(F32)[:, None, None, None])


def flip(images: jax.Array, do: jax.Array) -> jax.Array:
    """Horizontal mirror ``out[b, :, j] = x[b, :, W - 1 - j]`` of the images where the bool ``(B,)`` ``do``."""
    return jnp.where(do[:, None, None, None], images[:, :, ::-1], images)


_flip = flip  # augment_batch's ``flip`` argument shadows the function


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(x - mean) * (1 / std)`` over the last (channel) axis, float32; ``1 / std`` is computed in float64 on
    the host and rounded to float32, as ``jaxtl.data.augment.normalize`` does. ``mean``/``std`` are constants."""
    inv = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
    return (images.astype(F32) - jnp.asarray(np.asarray(mean, np.float32))) * jnp.asarray(inv)


def augment_batch(images_uint8: jax.Array, params: Mapping[str, jax.Array], has_affine: bool, flip: bool,
                  lighting: bool, mean: Sequence[float], std: Sequence[float], dtype: Any = F32) -> jax.Array:
    """The training batch transform: uint8 ``(B, S, S, 3)`` -> normalised ``dtype`` ``(B, S, S, 3)``.

    ``x = u8 / 255`` (float32), then :func:`apply_projective` with ``params["affine"]`` if ``has_affine``,
    else :func:`flip` with ``params["flip"]`` if ``flip``; then :func:`apply_lighting` with
    ``params["lighting"][:, 0]`` (bright) and ``[:, 1]`` (contrast) if ``lighting``; then :func:`normalize`
    and the cast to ``dtype``. ``params`` are ``jaxtl.data.augment.batch_aug_params`` draws; the three switches
    are static Python bools (:func:`static_flags`), so a disabled transform costs nothing.
    """
    x = _div(images_uint8.astype(F32), 255.0)
    if has_affine:
        x = apply_projective(x, params["affine"])
    elif flip:
        x = _flip(x, params["flip"])
    if lighting:
        light = params["lighting"]
        x = apply_lighting(x, light[:, 0], light[:, 1])
    return normalize(x, mean, std).astype(dtype)


def eval_batch(images_uint8: jax.Array, mean: Sequence[float], std: Sequence[float], dtype: Any = F32
               ) -> jax.Array:
    """The evaluation batch transform: ``normalize(u8 / 255)`` cast to ``dtype``."""
    return normalize(_div(images_uint8.astype(F32), 255.0), mean, std).astype(dtype)


# data.augment_device: where fastai's batch transforms (warp, flip, lighting, normalisation) run. "device" (the
# default): inside the jitted step, the pipeline sends uint8 + the draws (as fastai runs them on the GPU); "host":
# in the tf.data pipeline, which sends normalised float32 (the path before; for A/B runs and debugging). On 2 CPU
# cores the two measured the same step time (docs/performance.md).
AUGMENT_DEVICES = ("device", "host")


def augment_on_device(value: str) -> bool:
    """``data.augment_device`` -> True when the batch transforms run inside the step."""
    if value not in AUGMENT_DEVICES:
        raise ValueError(f"config field data.augment_device={value!r} is not valid; choose one of "
                         f"{list(AUGMENT_DEVICES)}")
    return value == "device"


@dataclass(frozen=True)
class BatchTransform:
    """The image transform of the jitted steps (static: hashable, part of the compiled program).

    ``train(batch)``: uint8 ``batch["image"]`` -> :func:`augment_batch` with the batch's draws; ``eval(images)``:
    uint8 -> :func:`eval_batch`. Images of any other dtype are taken as already normalised and returned as they
    are (so a float batch and its uint8 source give the same model input when the float one was made by the host
    transform). ``mean``/``std``: ``data.mean``/``data.std``; the switches: :func:`static_flags`.
    """

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    has_affine: bool = False
    flip: bool = False
    lighting: bool = False

    @classmethod
    def for_data(cls, data: Any) -> BatchTransform:
        """From a data bundle's ``mean``, ``std`` and ``aug`` (``AugParams``; none: no augmentation)."""
        aug = getattr(data, "aug", None)
        flags = static_flags(aug) if aug is not None else {}
        return cls(tuple(float(m) for m in data.mean), tuple(float(v) for v in data.std), **flags)

    def train(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        images = batch["image"]
        if images.dtype != jnp.uint8:
            return images
        return augment_batch(images, batch, self.has_affine, self.flip, self.lighting, self.mean, self.std)

    def eval(self, images: jax.Array) -> jax.Array:
        if images.dtype != jnp.uint8:
            return images
        return eval_batch(images, self.mean, self.std)
