"""fastai's item and batch augmentations as TensorFlow ops (run inside ``tf.data`` maps).

Item level (one image, uint8 in and out, as fastai's PIL-based item transforms):

* :func:`random_resized_crop_params` -- fastai's ``RandomResizedCrop.before_call`` (train split): 10 tries of
  ``area = U(min_scale, max_scale) * w * h``, ``ratio = exp(U(log r0, log r1))``,
  ``nw = round(sqrt(area * ratio))``, ``nh = round(sqrt(area / ratio))``; the first try with ``nw <= w`` and
  ``nh <= h`` wins and its top-left corner is uniform. If none fits, fastai's fallback: the largest centred crop
  whose aspect ratio lies within ``ratio``.
* :func:`resize_uint8` -- bilinear resize with antialiasing (PIL's ``BILINEAR`` resize is antialiased), rounded
  back to uint8 like a PIL image.
* :func:`eval_resize_crop` -- ``RandomResizedCrop`` on the validation split: squish the whole image to
  ``size + xtra`` (``xtra = ceil(size * 0.14 / 8) * 8``, 256 for 224) and take the centre ``size`` crop.

Batch level (float images in [0, 1], ``(B, S, S, 3)``), fastai's ``aug_transforms``:

* :func:`affine_transforms` -- one projective matrix per image combining ``Flip`` (p=0.5), ``Rotate``
  (±max_rotate degrees, p_affine), ``Zoom`` (U(min_zoom, max_zoom), random centre, p_affine) and ``Warp``
  (perspective with x/y magnitudes U(-max_warp, max_warp), each p_affine), composed as fastai composes them:
  source = Warp(Flip @ Rotate @ Zoom @ p) in [-1, 1] coordinates with ``align_corners=True``.
* :func:`apply_affine` -- the bilinear resampling with reflection padding.
* :func:`lighting` -- ``Brightness`` then ``Contrast`` in logit space: ``sigmoid((logit(x) + logit(b)) * c)`` with
  ``b ~ U(0.5(1-l), 0.5(1+l))``, ``c ~ exp(U(log(1-l), -log(1-l)))``, each with probability p_lighting.
* :func:`normalize` / :func:`denormalize` -- ``(x - mean) / std`` per channel.
* :func:`batch_aug_params` -- all random draws of :func:`augment_batch` for one batch (affine rows, flip coins,
  lighting), so the per-pixel work can run on the accelerator (``jaxtl.device_augment``) on the same draws.

All randomness is stateless (``tf.random.stateless_*`` with explicit ``[2]`` int64 seeds), so an image's
augmentation is a pure function of its seed: resuming mid-epoch reproduces the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxtl.data.tf_import import tf

VAL_XTRA = 0.14  # fastai's RandomResizedCrop(val_xtra=0.14)
LOGIT_EPS = 1e-7  # fastai's logit() clamps to [1e-7, 1 - 1e-7]


@dataclass(frozen=True)
class AugParams:
    """The augmentation switches of ``config.data`` (fastai's ``aug_transforms`` defaults)."""

    size: int = 224
    min_scale: float = 0.5
    flip: bool = True
    augment: bool = True
    max_rotate: float = 10.0
    min_zoom: float = 1.0
    max_zoom: float = 1.1
    max_warp: float = 0.2
    max_lighting: float = 0.2
    p_affine: float = 0.75
    p_lighting: float = 0.75

    @classmethod
    def from_config(cls, data_cfg: Any) -> AugParams:
        """Read the fields of ``config.data``; raise ``ValueError`` naming a bad field."""
        p = cls(
            size=int(data_cfg.size), min_scale=float(data_cfg.min_scale), flip=bool(data_cfg.flip),
            augment=bool(data_cfg.augment), max_rotate=float(data_cfg.max_rotate),
            min_zoom=float(data_cfg.min_zoom), max_zoom=float(data_cfg.max_zoom),
            max_warp=float(data_cfg.max_warp), max_lighting=float(data_cfg.max_lighting),
            p_affine=float(data_cfg.p_affine), p_lighting=float(data_cfg.p_lighting),
        )
        p.validate()
        return p

    def validate(self) -> None:
        if self.size < 2:
            raise ValueError(f"config field data.size must be >= 2 pixels, got {self.size}")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"config field data.min_scale must be in (0, 1], got {self.min_scale}")
        if not 0.0 < self.min_zoom <= self.max_zoom:
            raise ValueError(f"config fields data.min_zoom/max_zoom need 0 < min_zoom <= max_zoom, "
                             f"got {self.min_zoom}, {self.max_zoom}")
        if not 0.0 <= self.max_lighting < 1.0:
            raise ValueError(f"config field data.max_lighting must be in [0, 1), got {self.max_lighting}")
        if not 0.0 <= self.max_warp < 1.0:
            raise ValueError(f"config field data.max_warp must be in [0, 1), got {self.max_warp}")
        for name in ("p_affine", "p_lighting"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"config field data.{name} must be in [0, 1], got {v}")

    @property
    def has_affine(self) -> bool:
        """True when the batch affine/warp resampling has something to do."""
        if not self.augment:
            return False
        return bool(self.flip or self.max_rotate or self.max_warp or self.min_zoom < 1 or self.max_zoom > 1)


def eval_size(size: int, val_xtra: float = VAL_XTRA) -> int:
    """fastai's validation pre-crop side: ``size + ceil(size * val_xtra / 8) * 8`` (224 -> 256)."""
    return size + int(math.ceil(size * val_xtra / 8) * 8)


def _split(seed: tf.Tensor, n: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n))


def random_resized_crop_params(
    seed: tf.Tensor | Sequence[int],
    height: tf.Tensor | int,
    width: tf.Tensor | int,
    min_scale: float = 0.08,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    max_scale: float = 1.0,
    attempts: int = 10,
) -> tf.Tensor:
    """fastai's RandomResizedCrop crop box for a ``height x width`` image.

    Returns int32 ``[top, left, crop_h, crop_w]``. Arithmetic is float64 and ``round`` is half-to-even like
    Python's. One deviation: a try that rounds to a 0-pixel side is rejected (fastai would crash on it).
    """
    k_area, k_ratio, k_top, k_left = _split(tf.convert_to_tensor(seed), 4)
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    frac = tf.random.stateless_uniform([attempts], k_area, min_scale, max_scale, dtype=tf.float64)
    logr = tf.random.stateless_uniform([attempts], k_ratio, math.log(ratio[0]), math.log(ratio[1]),
                                       dtype=tf.float64)
    area = frac * w * h
    r = tf.exp(logr)
    nw = tf.round(tf.sqrt(area * r))
    nh = tf.round(tf.sqrt(area / r))
    fits = (nw <= w) & (nh <= h) & (nw >= 1) & (nh >= 1)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    hi, wi = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    # (clamped only so the corner draw below stays valid when no try fits; then the fallback is used)
    cw_try = tf.clip_by_value(tf.cast(nw[first], tf.int32), 1, wi)
    ch_try = tf.clip_by_value(tf.cast(nh[first], tf.int32), 1, hi)
    # randint(0, w - nw) is inclusive; stateless_uniform's maxval is exclusive.
    left_try = tf.random.stateless_uniform([], k_left, 0, wi - cw_try + 1, dtype=tf.int32)
    top_try = tf.random.stateless_uniform([], k_top, 0, hi - ch_try + 1, dtype=tf.int32)

    aspect = w / h
    cw_fb = tf.where(aspect < ratio[0], w, tf.where(aspect > ratio[1], tf.floor(h * ratio[1]), w))
    ch_fb = tf.where(aspect < ratio[0], tf.floor(w / ratio[0]), h)
    cw_fb, ch_fb = tf.cast(cw_fb, tf.int32), tf.cast(ch_fb, tf.int32)
    found = tf.reduce_any(fits)
    top = tf.where(found, top_try, (hi - ch_fb) // 2)
    left = tf.where(found, left_try, (wi - cw_fb) // 2)
    return tf.stack([top, left, tf.where(found, ch_try, ch_fb), tf.where(found, cw_try, cw_fb)])


def resize_uint8(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Antialiased bilinear resize of a uint8 ``(h, w, 3)`` image, rounded back to uint8 (as PIL does)."""
    out = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def eval_resize_crop(image: tf.Tensor, size: int, val_xtra: float = VAL_XTRA) -> tf.Tensor:
    """Validation transform: squish to ``eval_size(size)`` square, then the centre ``size`` crop. uint8."""
    big = eval_size(size, val_xtra)
    off = (big - size) // 2
    return resize_uint8(image, big, big)[off:off + size, off:off + size]


def _mat3(rows: list[list[tf.Tensor]]) -> tf.Tensor:
    """Stack a 3x3 nested list of (n,) tensors into (n, 3, 3)."""
    return tf.stack([tf.stack(r, axis=-1) for r in rows], axis=-2)


def _homography(src: tf.Tensor, dst: tf.Tensor) -> tf.Tensor:
    """(n, 3, 3) homographies mapping ``src`` (n, 4, 2) points onto ``dst`` (fastai's ``find_coeffs(dst, src)``)."""
    rows, rhs = [], []
    zero = tf.zeros_like(src[:, 0, 0])
    one = tf.ones_like(zero)
    for i in range(4):
        sx, sy, dx, dy = src[:, i, 0], src[:, i, 1], dst[:, i, 0], dst[:, i, 1]
        rows.append(tf.stack([sx, sy, one, zero, zero, zero, -dx * sx, -dx * sy], axis=-1))
        rows.append(tf.stack([zero, zero, zero, sx, sy, one, -dy * sx, -dy * sy], axis=-1))
        rhs += [dx, dy]
    a = tf.stack(rows, axis=1)
    b = tf.stack(rhs, axis=1)[..., None]
    coeffs = tf.linalg.solve(a, b)[..., 0]
    return tf.reshape(tf.concat([coeffs, one[:, None]], axis=1), [-1, 3, 3])


def affine_draws(seed: tf.Tensor, n: int | tf.Tensor, p: AugParams) -> dict[str, tf.Tensor]:
    """fastai's per-image random draws for Flip/Rotate/Zoom/Warp, each float64 ``(n,)``.

    ``flip`` = -1 with probability 0.5 (else 1); ``theta`` degrees ~ U(-max_rotate, max_rotate) with
    probability p_affine (else 0); ``zoom`` ~ U(min_zoom, max_zoom) w.p. p_affine (else 1) and its centre
    ``col``, ``row`` ~ U(0, 1); warp magnitudes ``xt``, ``yt`` ~ U(-max_warp, max_warp), each w.p. p_affine.
    A disabled transform draws its neutral value.
    """
    keys = _split(seed, 12)
    f64 = tf.float64
    shape = tf.reshape(tf.cast(n, tf.int32), [1])
    zero, one = tf.zeros(shape, f64), tf.ones(shape, f64)

    def uniform(k: tf.Tensor, lo: float, hi: float) -> tf.Tensor:
        return tf.random.stateless_uniform(shape, k, lo, hi, dtype=f64)

    def coin(k: tf.Tensor, prob: float) -> tf.Tensor:
        return tf.random.stateless_uniform(shape, k, dtype=f64) < prob

    d = {"flip": one, "theta": zero, "zoom": one, "col": uniform(keys[5], 0.0, 1.0),
         "row": uniform(keys[6], 0.0, 1.0), "xt": zero, "yt": zero}
    if p.flip:
        d["flip"] = tf.where(coin(keys[0], 0.5), -one, one)
    if p.max_rotate:
        d["theta"] = tf.where(coin(keys[1], p.p_affine), uniform(keys[2], -p.max_rotate, p.max_rotate), zero)
    if p.min_zoom < 1 or p.max_zoom > 1:
        d["zoom"] = tf.where(coin(keys[3], p.p_affine), uniform(keys[4], p.min_zoom, p.max_zoom), one)
    if p.max_warp:
        d["xt"] = tf.where(coin(keys[7], p.p_affine), uniform(keys[8], -p.max_warp, p.max_warp), zero)
        d["yt"] = tf.where(coin(keys[9], p.p_affine), uniform(keys[10], -p.max_warp, p.max_warp), zero)
    return d


def affine_matrix(flip: tf.Tensor, theta: tf.Tensor, zoom: tf.Tensor, col: tf.Tensor, row: tf.Tensor,
                  xt: tf.Tensor, yt: tf.Tensor, size: int) -> tf.Tensor:
    """(n, 8) float32 ``ImageProjectiveTransformV3`` rows (output pixel (x, y) -> input pixel) from draws.

    In fastai's [-1, 1] coordinates (align_corners=True) the source point of output point ``q`` is
    ``Warp(F @ R @ Z @ q)``: F = diag(flip, 1), R = [[cos t, sin t], [-sin t, cos t]] (t = theta degrees),
    Z = [[s, 0, (1-s)(2 col-1)], [0, s, (1-s)(2 row-1)]] with s = 1/zoom, and Warp the homography sending
    fastai's perturbed corners ``(-1-yt, -1-xt), (-1+yt, 1+xt), (1+yt, -1+xt), (1-yt, 1-xt)`` onto the
    corners ``(-1,-1), (-1,1), (1,-1), (1,1)`` (fastai's ``find_coeffs(orig_pts, targ_pts)``).
    """
    f64 = tf.float64
    flip, theta, zoom, col, row, xt, yt = (tf.cast(v, f64) for v in (flip, theta, zoom, col, row, xt, yt))
    zero, one = tf.zeros_like(flip), tf.ones_like(flip)
    fm = _mat3([[flip, zero, zero], [zero, one, zero], [zero, zero, one]])
    t = theta * (math.pi / 180.0)
    c, s_ = tf.cos(t), tf.sin(t)
    rm = _mat3([[c, s_, zero], [-s_, c, zero], [zero, zero, one]])
    s = 1.0 / zoom
    zm = _mat3([[s, zero, (1 - s) * (2 * col - 1)], [zero, s, (1 - s) * (2 * row - 1)], [zero, zero, one]])
    corners = tf.constant([[-1, -1], [-1, 1], [1, -1], [1, 1]], f64)
    orig = tf.broadcast_to(corners, tf.concat([tf.shape(flip), [4, 2]], 0))
    targ = tf.stack([tf.stack([-1 - yt, -1 - xt], -1), tf.stack([-1 + yt, 1 + xt], -1),
                     tf.stack([1 + yt, -1 + xt], -1), tf.stack([1 - yt, 1 - xt], -1)], axis=1)
    mat = _homography(targ, orig) @ fm @ rm @ zm
    half = (size - 1) / 2.0
    to_norm = tf.constant([[1 / half, 0, -1], [0, 1 / half, -1], [0, 0, 1]], f64)
    to_pix = tf.constant([[half, 0, half], [0, half, half], [0, 0, 1]], f64)
    full = to_pix @ mat @ to_norm
    full = full / full[:, 2:3, 2:3]
    return tf.cast(tf.reshape(full, [-1, 9])[:, :8], tf.float32)


def affine_transforms(seed: tf.Tensor, n: int | tf.Tensor, size: int, p: AugParams) -> tf.Tensor:
    """Random fastai Flip/Rotate/Zoom/Warp as (n, 8) projective rows: ``affine_matrix(**affine_draws(...))``."""
    return affine_matrix(**affine_draws(seed, n, p), size=size)


def apply_affine(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    """Bilinear projective resampling of float ``(B, H, W, C)`` images with reflection padding.

    TF's REFLECT mirrors about the image edge (d c b a | a b c d), fastai's grid_sample reflection about the
    edge pixels' centres: they differ by half a pixel in the padded margin only.
    """
    shape = tf.shape(images)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")


def lighting_draws(seed: tf.Tensor, n: int | tf.Tensor, max_lighting: float, p: float
                   ) -> tuple[tf.Tensor, tf.Tensor]:
    """fastai's Brightness/Contrast draws, float32 ``(n,)`` each: ``bright ~ U(0.5(1-l), 0.5(1+l))`` (else 0.5)
    and ``contrast ~ exp(U(log(1-l), -log(1-l)))`` (else 1), each applied with probability ``p``."""
    keys = _split(seed, 4)
    shape = tf.reshape(tf.cast(n, tf.int32), [1])
    lo = math.log(1 - max_lighting)
    bright = tf.where(tf.random.stateless_uniform(shape, keys[0]) < p,
                      tf.random.stateless_uniform(shape, keys[1], 0.5 * (1 - max_lighting),
                                                  0.5 * (1 + max_lighting)), 0.5)
    contrast = tf.where(tf.random.stateless_uniform(shape, keys[2]) < p,
                        tf.exp(tf.random.stateless_uniform(shape, keys[3], lo, -lo)), 1.0)
    return bright, contrast


def apply_lighting(images: tf.Tensor, bright: tf.Tensor, contrast: tf.Tensor) -> tf.Tensor:
    """``sigmoid((logit(x) + logit(bright)) * contrast)`` per image; ``x`` float ``(B, H, W, C)`` in [0, 1]
    clipped to [1e-7, 1 - 1e-7] first (fastai's ``logit``)."""
    x = tf.clip_by_value(images, LOGIT_EPS, 1 - LOGIT_EPS)
    logit = tf.math.log(x / (1 - x))
    shift = tf.math.log(bright / (1 - bright))[:, None, None, None]
    return tf.sigmoid((logit + shift) * contrast[:, None, None, None])


def lighting(images: tf.Tensor, seed: tf.Tensor, max_lighting: float, p: float) -> tf.Tensor:
    """fastai's Brightness then Contrast on float ``(B, H, W, C)`` images in [0, 1] (logit space)."""
    return apply_lighting(images, *lighting_draws(seed, tf.shape(images)[0], max_lighting, p))


def normalize(images: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """``(x - mean) / std`` over the last (channel) axis; ``x`` float in [0, 1]."""
    inv = [1.0 / float(v) for v in std]  # multiply by the reciprocal: cheaper than a divide per pixel
    return (images - tf.constant(mean, tf.float32)) * tf.constant(inv, tf.float32)


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`normalize` for plotting: float32 in [0, 1] (clipped), same shape."""
    x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(x, 0.0, 1.0)


def flip_coins(seed: tf.Tensor, n: int | tf.Tensor) -> tf.Tensor:
    """``flip_batch``'s per-image coin, bool ``(n,)``: ``U(0, 1) < 0.5``."""
    return tf.random.stateless_uniform(tf.reshape(tf.cast(n, tf.int32), [1]), tf.cast(seed, tf.int64)) < 0.5


def flip_batch(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Horizontal flip of each image with probability 0.5 (used when only ``flip`` is on)."""
    do = flip_coins(seed, tf.shape(images)[0])
    return tf.where(do[:, None, None, None], tf.reverse(images, axis=[2]), images)


def batch_aug_params(seed: tf.Tensor, n: int | tf.Tensor, p: AugParams) -> dict[str, tf.Tensor]:
    """Every random draw :func:`augment_batch` makes for ``n`` images of side ``p.size`` with ``seed``.

    Keys (always all three, fixed shapes and dtypes, so a batch's structure never depends on ``p``):

    * ``"affine"``: float32 ``(n, 8)`` projective rows (``affine_transforms``) when ``p.has_affine``, else the
      identity rows ``[1, 0, 0, 0, 1, 0, 0, 0]``;
    * ``"flip"``: bool ``(n,)`` mirror coins (``flip_batch``), drawn only when ``p.flip`` and not
      ``p.has_affine`` (all False otherwise);
    * ``"lighting"``: float32 ``(n, 2)`` = (bright, contrast) (``lighting_draws``) when ``p.augment`` and
      ``p.max_lighting > 0``, else the neutral (0.5, 1.0).

    The seed is split as :func:`augment_batch` splits it (``k_aff, k_light, k_flip``), so applying these
    (here or on the accelerator, ``jaxtl.device_augment``) reproduces ``augment_batch`` on the same seed.
    """
    k_aff, k_light, k_flip = _split(seed, 3)
    shape = tf.reshape(tf.cast(n, tf.int32), [1])
    if p.has_affine:
        affine = affine_transforms(k_aff, n, p.size, p)
    else:
        affine = tf.tile(tf.constant([[1, 0, 0, 0, 1, 0, 0, 0]], tf.float32), tf.concat([shape, [1]], 0))
    flip = flip_coins(k_flip, n) if (p.flip and not p.has_affine) else tf.zeros(shape, tf.bool)
    if p.augment and p.max_lighting > 0:
        bright, contrast = lighting_draws(k_light, n, p.max_lighting, p.p_lighting)
    else:
        bright, contrast = tf.fill(shape, 0.5), tf.ones(shape, tf.float32)
    return {"affine": affine, "flip": flip, "lighting": tf.stack([bright, contrast], axis=1)}


def augment_batch(images: tf.Tensor, seed: tf.Tensor, p: AugParams) -> tf.Tensor:
    """The batch transforms in fastai's order: affine/warp (order 30) then lighting (order 40). [0, 1] floats.

    Applies the draws of :func:`batch_aug_params` (``jaxtl.device_augment.augment_batch`` is the same on the
    accelerator).
    """
    d = batch_aug_params(seed, tf.shape(images)[0], p)
    if p.has_affine:
        images = apply_affine(images, d["affine"])
    elif p.flip:
        images = tf.where(d["flip"][:, None, None, None], tf.reverse(images, axis=[2]), images)
    if p.augment and p.max_lighting > 0:
        images = apply_lighting(images, d["lighting"][:, 0], d["lighting"][:, 1])
    return images
