"""Label smoothing, MixUp and CutMix inside the jitted train step (timm ``Mixup`` semantics, batch mode).

Per batch (timm ``Mixup._params_per_batch`` / ``_mix_batch`` / ``mixup_target``), with ``u ~ U(0, 1)`` draws:

* mixing applies when ``u_apply < train.mix_prob`` (and some alpha > 0), else ``λ = 1`` (the plain batch);
* both alphas > 0: CutMix when ``u_switch < train.mix_switch_prob``, else MixUp; one alpha > 0: that one;
* ``λ ~ Beta(α, α)`` with the chosen method's α;
* MixUp: ``x' = λ x + (1 - λ) flip(x)`` (``flip``: the batch reversed along its first axis);
* CutMix: ``r = sqrt(1 - λ)``, ``cut_h = int(H r)``, ``cut_w = int(W r)``, centre ``cy ~ U{0..H-1}``,
  ``cx ~ U{0..W-1}``, box rows ``[clip(cy - cut_h//2, 0, H), clip(cy + cut_h//2, 0, H))`` (columns alike);
  ``x'`` = ``x`` with ``flip(x)`` pasted into the box, and ``λ`` corrected to the area kept:
  ``λ = 1 - box_area / (H W)``;
* targets: ``y' = λ smooth(y) + (1 - λ) smooth(flip(y))`` with ``smooth(y) = (1 - ε) onehot(y) + ε / K``
  (``train.label_smoothing`` = ε; ``optax.smooth_labels``; fastai's ``LabelSmoothingCrossEntropy`` is the same
  loss); the loss is ``CE(logits, y') = λ CE(logits, smooth(y)) + (1 - λ) CE(logits, smooth(flip(y)))``.

Papers: MixUp (Zhang et al. 2018, arXiv:1710.09412), CutMix (Yun et al. 2019, arXiv:1905.04899), label smoothing
(Szegedy et al. 2016, arXiv:1512.00567). Written here rather than taken from a library because none does it on
JAX arrays inside a jitted step (timm's is PyTorch on the host side of the step). ``train.mix_off_epoch``
(timm's ``mixup_off_epoch``) is applied by the caller: it builds the step without mixing from that epoch on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

MIX_STREAM = 1  # the mix key is fold_in(step key, MIX_STREAM); the step key itself stays dropout's


@dataclass(frozen=True)
class Regularise:
    """``train.label_smoothing``, ``train.mixup_alpha``, ``train.cutmix_alpha``, ``train.mix_prob``,
    ``train.mix_switch_prob`` (validated by ``jaxtl.config.validate``)."""

    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5

    @classmethod
    def from_config(cls, train: Any) -> Regularise:
        return cls(float(train.label_smoothing), float(train.mixup_alpha), float(train.cutmix_alpha),
                   float(train.mix_prob), float(train.mix_switch_prob))

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def active(self) -> bool:
        """False: the step keeps the plain integer-label cross-entropy (bit-identical to no regularisation)."""
        return self.mixes or self.label_smoothing > 0

    def without_mixing(self) -> Regularise:
        """The same label smoothing, no MixUp / CutMix (``train.mix_off_epoch`` reached)."""
        return Regularise(self.label_smoothing)


class Draws(NamedTuple):
    """One batch's random choices: ``apply`` (bool), ``cutmix`` (bool), ``lam`` (Beta draw, before the CutMix
    area correction), ``cy``, ``cx`` (int32 box centre)."""

    apply: jax.Array
    cutmix: jax.Array
    lam: jax.Array
    cy: jax.Array
    cx: jax.Array


def draws(key: jax.Array, height: int, width: int, reg: Regularise) -> Draws:
    """The batch's draws (module docstring), as timm's ``_params_per_batch`` + ``rand_bbox``."""
    k_apply, k_switch, k_lam, k_y, k_x = jax.random.split(key, 5)
    apply = jax.random.uniform(k_apply) < reg.mix_prob
    if reg.mixup_alpha > 0 and reg.cutmix_alpha > 0:
        cutmix = jax.random.uniform(k_switch) < reg.mix_switch_prob
    else:
        cutmix = jnp.asarray(reg.cutmix_alpha > 0)
    alpha = jnp.where(cutmix, reg.cutmix_alpha, reg.mixup_alpha).astype(jnp.float32)
    lam = jax.random.beta(k_lam, alpha, alpha)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    return Draws(apply, cutmix, lam, cy, cx)


def box(d: Draws, height: int, width: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """CutMix's box ``(y0, y1, x0, x1)`` (half-open) from the draws: timm's ``rand_bbox``."""
    ratio = jnp.sqrt(1.0 - d.lam)
    cut_h = (height * ratio).astype(jnp.int32)  # int(): truncation, as timm
    cut_w = (width * ratio).astype(jnp.int32)
    y0, y1 = jnp.clip(d.cy - cut_h // 2, 0, height), jnp.clip(d.cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(d.cx - cut_w // 2, 0, width), jnp.clip(d.cx + cut_w // 2, 0, width)
    return y0, y1, x0, x1


def mix(images: jax.Array, d: Draws) -> tuple[jax.Array, jax.Array]:
    """``images`` (B, H, W, C) mixed with their reverse as the draws say; returns (images, λ) with λ = 1 when
    nothing was mixed and CutMix's λ the area kept."""
    height, width = images.shape[1], images.shape[2]
    flipped = images[::-1]
    y0, y1, x0, x1 = box(d, height, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    cut = jnp.where(inside[None, :, :, None], flipped, images)
    cut_lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
    lam_f = d.lam.astype(images.dtype)
    blended = lam_f * images + (1 - lam_f) * flipped
    mixed = jnp.where(d.cutmix, cut, blended)
    lam = jnp.where(d.cutmix, cut_lam, d.lam)
    return jnp.where(d.apply, mixed, images), jnp.where(d.apply, lam, 1.0).astype(jnp.float32)


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, eps: float) -> jax.Array:
    """Per-example ``CE(logits, (1 - eps) onehot(labels) + eps / K)`` in float32 (``optax.smooth_labels``)."""
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32), eps)
    return optax.softmax_cross_entropy(logits, targets)


def mixed_loss(logits: jax.Array, labels: jax.Array, lam: jax.Array, eps: float) -> jax.Array:
    """Mean over the batch of ``λ CE(smooth(y)) + (1 - λ) CE(smooth(flip(y)))`` (= CE with timm's mixed
    target)."""
    ce = smoothed_cross_entropy(logits, labels, eps)
    ce_flip = smoothed_cross_entropy(logits, labels[::-1], eps)
    return (lam * ce + (1.0 - lam) * ce_flip).mean()


def regularised_loss(logits: jax.Array, labels: jax.Array, lam: jax.Array, reg: Regularise) -> jax.Array:
    """The step's loss: :func:`mixed_loss` when mixing, else the label-smoothed cross-entropy's mean."""
    if not reg.mixes:
        return smoothed_cross_entropy(logits, labels, reg.label_smoothing).mean()
    return mixed_loss(logits, labels, lam, reg.label_smoothing)


def regularised_batch(key: jax.Array, images: jax.Array, reg: Regularise) -> tuple[jax.Array, jax.Array]:
    """The step's entry point: (model input, λ) for a batch; λ = 1 without mixing."""
    if not reg.mixes:
        return images, jnp.ones((), jnp.float32)
    d = draws(jax.random.fold_in(key, MIX_STREAM), images.shape[1], images.shape[2], reg)
    return mix(images, d)
