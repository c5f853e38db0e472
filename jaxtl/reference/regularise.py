"""NumPy (float64) transcriptions of label smoothing, MixUp and CutMix, and the checks of ``jaxtl.mix`` against them.

Transcribed from the peers' definitions, independently of ``jaxtl.mix``:

* fastai ``LabelSmoothingCrossEntropy`` (reduction mean):
  ``loss = eps * mean_b(-sum_c log p_bc) / K + (1 - eps) * mean_b(-log p_b,y_b)``;
* timm ``Mixup`` in batch mode (``_mix_batch`` with ``rand_bbox`` / ``cutmix_bbox_and_lam(correct_lam=True)``,
  then ``mixup_target``), with its random draws passed in, the image layout NHWC instead of NCHW.

``check_rows()`` returns rows for ``scripts/check_formulas.py``: the images, targets and losses of fixed draws, and the
draw distribution over many batches (the Beta moments, the apply / switch probabilities, the box centre).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import mix

TOL = 1e-6  # float32 jaxtl vs float64 transcription: a softmax and a few products


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def fastai_label_smoothing_ce(logits: np.ndarray, labels: np.ndarray, eps: float) -> float:
    """fastai ``LabelSmoothingCrossEntropy(eps, reduction='mean')``."""
    lp = log_softmax(np.asarray(logits, np.float64))
    k = lp.shape[-1]
    nll = -lp[np.arange(len(labels)), labels].mean()
    return float(eps * (-lp.sum(-1)).mean() / k + (1 - eps) * nll)


def timm_mixup(x: np.ndarray, target: np.ndarray, num_classes: int, *, applied: bool, use_cutmix: bool,
               lam: float, cy: int, cx: int, smoothing: float) -> tuple[np.ndarray, np.ndarray, float]:
    """timm ``Mixup.__call__`` (mode 'batch') given its draws: (mixed images, soft targets, λ)."""
    x = np.array(x, np.float64)
    if not applied:
        lam = 1.0
    if lam != 1.0:
        if use_cutmix:
            img_h, img_w = x.shape[1], x.shape[2]
            ratio = np.sqrt(1 - lam)
            cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
            yl, yh = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
            xl, xh = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
            x[:, yl:yh, xl:xh] = x[::-1][:, yl:yh, xl:xh]
            lam = 1.0 - (yh - yl) * (xh - xl) / float(img_h * img_w)
        else:
            x = x * lam + x[::-1] * (1 - lam)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = np.full((len(target), num_classes), off)
    y1[np.arange(len(target)), target] = on
    y2 = np.full((len(target), num_classes), off)
    y2[np.arange(len(target)), target[::-1]] = on
    return x, y1 * lam + y2 * (1 - lam), float(lam)


def soft_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(-(targets * log_softmax(np.asarray(logits, np.float64))).sum(-1).mean())


# (name, applied, cutmix, λ, cy, cx): MixUp, CutMix inside and at the corners (clipped boxes), no mixing
CASES = [("MixUp λ=0.3", True, False, 0.3, 0, 0), ("MixUp λ=0.93", True, False, 0.93, 0, 0),
         ("CutMix λ=0.4 centre", True, True, 0.4, 6, 5), ("CutMix λ=0.1 corner", True, True, 0.1, 0, 11),
         ("CutMix λ=0.75 edge", True, True, 0.75, 12, 0), ("not applied", False, True, 0.2, 3, 3)]


def _rel(a: np.ndarray | float, r: np.ndarray | float) -> tuple[float, float]:
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    diff = float(np.max(np.abs(a - r))) if a.size else 0.0
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    return diff, (diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))


def case_diffs(smoothing: float = 0.1, batch: int = 7, size: tuple[int, int] = (13, 12), classes: int = 5,
               seed: int = 0) -> dict[str, tuple[float, float]]:
    """Max (abs, rel) differences over :data:`CASES` of jaxtl's images, λ and loss vs timm's (and fastai's label
    smoothing alone), for one random batch (odd size: the middle image mixes with itself)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *size, 3)).astype(np.float32)
    y = rng.integers(0, classes, batch)
    logits = rng.standard_normal((batch, classes)).astype(np.float32) * 3
    reg = mix.Regularise(label_smoothing=smoothing, mixup_alpha=1.0, cutmix_alpha=1.0)
    worst = {"images": (0.0, 0.0), "λ": (0.0, 0.0), "loss": (0.0, 0.0)}

    def keep(q: str, d: tuple[float, float]) -> None:
        worst[q] = (max(worst[q][0], d[0]), max(worst[q][1], d[1]))

    for _, applied, cut, lam, cy, cx in CASES:
        d = mix.Draws(jnp.asarray(applied), jnp.asarray(cut), jnp.float32(lam), jnp.int32(cy), jnp.int32(cx))
        got_x, got_lam = mix.mix(jnp.asarray(x), d)
        got_loss = mix.regularised_loss(jnp.asarray(logits), jnp.asarray(y), got_lam, reg)
        ref_x, ref_t, ref_lam = timm_mixup(x, y, classes, applied=applied, use_cutmix=cut,
                                           lam=float(np.float32(lam)), cy=cy, cx=cx, smoothing=smoothing)
        keep("images", _rel(np.asarray(got_x), ref_x))
        keep("λ", _rel(float(got_lam), ref_lam))
        keep("loss", _rel(float(got_loss), soft_cross_entropy(logits, ref_t)))
    plain = mix.regularised_loss(jnp.asarray(logits), jnp.asarray(y), jnp.float32(1), mix.Regularise(smoothing))
    worst["label smoothing loss"] = _rel(float(plain), fastai_label_smoothing_ce(logits, y, smoothing))
    return worst


def draw_stats(n: int = 20000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """(measured, expected) statistics of ``mix.draws`` over ``n`` batches: P(apply), P(CutMix), the Beta
    moments of each method's λ (mean 1/2, variance 1 / (4 (2α + 1))) and the box centre's mean (H-1)/2."""
    reg = mix.Regularise(mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.6, mix_switch_prob=0.3)
    h, w = 20, 30
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    d = jax.vmap(lambda k: mix.draws(k, h, w, reg))(keys)
    apply, cut, lam = np.asarray(d.apply), np.asarray(d.cutmix), np.asarray(d.lam, np.float64)
    out = {"P(apply)": (apply.mean(), reg.mix_prob), "P(CutMix)": (cut.mean(), reg.mix_switch_prob),
           "centre row mean": (np.asarray(d.cy).mean(), (h - 1) / 2), "centre col mean": (np.asarray(d.cx).mean(),
                                                                                         (w - 1) / 2)}
    for name, sel, alpha in (("MixUp", ~cut, reg.mixup_alpha), ("CutMix", cut, reg.cutmix_alpha)):
        out[f"{name} E[λ]"] = (lam[sel].mean(), 0.5)
        out[f"{name} Var[λ]"] = (lam[sel].var(), 1 / (4 * (2 * alpha + 1)))
    return out


STAT_TOL = 0.05  # relative; 20000 draws: the standard errors are <= 1% of each expected value


def check_rows() -> list[tuple[str, str, float, float, float, str]]:
    """Rows for ``scripts/check_formulas.py``: (rule, quantity, max abs diff, max rel diff, tolerance, source)."""
    rows = []
    for q, (a, r) in case_diffs().items():
        rows.append(("label smoothing + MixUp/CutMix (timm Mixup, fastai LS-CE), fixed draws", q, a, r, TOL,
                     "jaxtl/mix.py:mix, regularised_loss"))
    for q, (got, want) in draw_stats().items():
        a, r = _rel(got, want)
        rows.append(("MixUp/CutMix draws (20000 batches, α=0.4/1.0, p=0.6, switch=0.3)", q, a, r, STAT_TOL,
                     "jaxtl/mix.py:draws"))
    return rows
