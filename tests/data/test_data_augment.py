"""fastai's RandomResizedCrop / aug_transforms in TF ops, checked against transcriptions of fastai's code.

The torch references below transcribe fastai.vision.augment (affine_grid + perspective coords +
grid_sample(reflection, align_corners=True); logit-space lighting; PIL resize for validation).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from PIL import Image

from jaxtl.data import augment
from jaxtl.data.augment import AugParams, eval_size, random_resized_crop_params


@tf.function
def _many_crops(h, w, min_scale, n):
    key = tf.constant([3, 4], tf.int64)
    return tf.map_fn(lambda i: random_resized_crop_params(tf.random.experimental.stateless_fold_in(key, i),
                                                          h, w, min_scale),
                     tf.range(n), fn_output_signature=tf.int32)


def _fastai_rrc(w, h, min_scale, ratio=(3 / 4, 4 / 3)):
    """fastai RandomResizedCrop.before_call (train), returns (top, left, ch, cw)."""
    for _ in range(10):
        area = random.uniform(min_scale, 1.0) * w * h
        r = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        nw, nh = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
        if nw <= w and nh <= h:
            return random.randint(0, h - nh), random.randint(0, w - nw), nh, nw
    if w / h < ratio[0]:
        cw, ch = w, int(w / ratio[0])
    elif w / h > ratio[1]:
        cw, ch = int(h * ratio[1]), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@pytest.mark.parametrize("h,w,min_scale", [(200, 300, 0.5), (200, 300, 0.08), (64, 48, 0.35)])
def test_random_resized_crop_statistics_match_fastai(h, w, min_scale):
    n = 3000
    boxes = _many_crops(h, w, min_scale, n).numpy()
    top, left, ch, cw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    frac = ch * cw / (h * w)
    slack = 2.0 / min(h, w)  # rounding of nw, nh
    assert frac.min() >= min_scale - 2 * slack and frac.max() <= 1.0 + 1e-9
    aspect = cw / ch
    assert aspect.min() >= 0.75 - 2 * slack and aspect.max() <= 4 / 3 + 2 * slack
    random.seed(0)
    ref = np.array([_fastai_rrc(w, h, min_scale) for _ in range(n)])
    rfrac = ref[:, 2] * ref[:, 3] / (h * w)
    assert abs(frac.mean() - rfrac.mean()) < 0.015
    assert abs(np.log(aspect).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.02
    # positions are uniform over the free range: the crop centre averages to the image centre
    assert abs((left + cw / 2).mean() - w / 2) < 0.03 * w and abs((top + ch / 2).mean() - h / 2) < 0.03 * h


@pytest.mark.parametrize("h,w,expected", [
    (100, 10, [43, 0, 13, 10]),  # tall: (w, int(w / 0.75)) centred
    (10, 100, [0, 43, 10, 13]),  # wide: (int(h * 4/3), h) centred
])
def test_random_resized_crop_fallback(h, w, expected):
    for s in range(5):
        box = random_resized_crop_params(tf.constant([s, 1], tf.int64), h, w, 0.5).numpy()
        assert box.tolist() == expected
    random.seed(1)
    assert list(_fastai_rrc(w, h, 0.5)) == expected


def test_crop_is_a_pure_function_of_the_seed():
    a = random_resized_crop_params([1, 2], 120, 90, 0.3).numpy()
    b = random_resized_crop_params([1, 2], 120, 90, 0.3).numpy()
    c = random_resized_crop_params([1, 3], 120, 90, 0.3).numpy()
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_eval_transform_matches_fastai_pil():
    assert eval_size(224) == 256 and eval_size(64) == 80 and eval_size(32) == 40
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:150, 0:210]
    arr = np.stack([xx, yy, (xx + yy) / 2], -1) + rng.normal(0, 8, (150, 210, 3))
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    ours = augment.eval_resize_crop(tf.constant(arr), 64).numpy()
    # fastai: crop_pad(orig size, (0, 0), resize_to=(80, 80)) then crop_pad(64) centred: tl = (80 - 64) // 2
    ref = np.asarray(Image.fromarray(arr).resize((80, 80), Image.BILINEAR))[8:72, 8:72]
    assert ours.shape == (64, 64, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 1.5


def _fastai_affine_torch(img, flip, theta, zoom, col, row, xt, yt):
    """fastai's Flip/Rotate/Zoom/Warp batch transform on (1, C, H, W): returns (output, source coords)."""
    d = lambda v: torch.tensor([v], dtype=torch.float64)
    flip, theta, zoom, col, row, xt, yt = map(d, (flip, theta, zoom, col, row, xt, yt))
    t0, t1 = torch.zeros_like(flip), torch.ones_like(flip)

    def affine_mat(*ms):
        return torch.stack([torch.stack([ms[0], ms[1], ms[2]], 1), torch.stack([ms[3], ms[4], ms[5]], 1),
                            torch.stack([t0, t0, t1], 1)], 1)

    th = theta * math.pi / 180
    s = 1 / zoom
    mat = (affine_mat(flip, t0, t0, t0, t1, t0) @ affine_mat(th.cos(), th.sin(), t0, -th.sin(), th.cos(), t0)
           @ affine_mat(s, t0, (1 - s) * (2 * col - 1), t0, s, (1 - s) * (2 * row - 1)))
    coords = F.affine_grid(mat[:, :2], img.shape, align_corners=True)
    # _WarpCoord: find_coeffs(orig_pts, targ_pts) then apply_perspective
    orig = torch.tensor([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=torch.float64)[None]
    targ = torch.stack([torch.stack([-1 - yt, -1 - xt]), torch.stack([-1 + yt, 1 + xt]),
                        torch.stack([1 + yt, -1 + xt]), torch.stack([1 - yt, 1 - xt])]).permute(2, 0, 1)
    p1, p2 = orig, targ
    m = []
    for i in range(4):
        m.append(torch.stack([p2[:, i, 0], p2[:, i, 1], t1, t0, t0, t0, -p1[:, i, 0] * p2[:, i, 0],
                              -p1[:, i, 0] * p2[:, i, 1]]))
        m.append(torch.stack([t0, t0, t0, p2[:, i, 0], p2[:, i, 1], t1, -p1[:, i, 1] * p2[:, i, 0],
                              -p1[:, i, 1] * p2[:, i, 1]]))
    a = torch.stack(m).permute(2, 0, 1)
    coeffs = torch.linalg.solve(a, p1.reshape(1, 8, 1))
    sz = coords.shape
    c = coords.view(1, -1, 2)
    coeffs = torch.cat([coeffs, t1[:, None, None]], dim=1).view(1, 3, 3)
    c1 = c @ coeffs[..., :2].transpose(1, 2) + coeffs[..., 2].unsqueeze(1)
    coords = (c1 / c1[..., 2].unsqueeze(-1))[..., :2].view(*sz)
    out = F.grid_sample(img, coords, mode="bilinear", padding_mode="reflection", align_corners=True)
    return out, coords


@pytest.mark.parametrize("draws", [
    dict(flip=1, theta=0, zoom=1, col=0.5, row=0.5, xt=0, yt=0),
    dict(flip=-1, theta=0, zoom=1, col=0.5, row=0.5, xt=0, yt=0),
    dict(flip=1, theta=8.5, zoom=1, col=0.5, row=0.5, xt=0, yt=0),
    dict(flip=-1, theta=-6, zoom=1.08, col=0.2, row=0.9, xt=0, yt=0),
    dict(flip=1, theta=0, zoom=1, col=0.5, row=0.5, xt=0.15, yt=-0.1),
    dict(flip=-1, theta=9, zoom=1.05, col=0.7, row=0.3, xt=-0.18, yt=0.12),
])
def test_affine_warp_matches_fastai_grid_sample(draws):
    size = 40
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin(3 * xx + yy), np.cos(2 * yy - xx), xx * yy], -1) * 0.4 + 0.5
    img = (img + rng.normal(0, 0.02, img.shape)).astype(np.float32)
    tfm = augment.affine_matrix(**{k: tf.constant([v], tf.float64) for k, v in draws.items()}, size=size)
    ours = augment.apply_affine(tf.constant(img[None]), tfm).numpy()[0]
    ref, coords = _fastai_affine_torch(torch.tensor(img).permute(2, 0, 1)[None].double(), **draws)
    ref = ref[0].permute(1, 2, 0).numpy()
    # compare where fastai samples inside the image (the reflected margin differs by half a pixel)
    inside = (coords[0].abs() <= 1).all(-1).numpy()
    assert inside.mean() > 0.6
    np.testing.assert_allclose(ours[inside], ref[inside], atol=2e-4)


def test_affine_draw_statistics():
    p = AugParams(max_rotate=10, min_zoom=1.0, max_zoom=1.1, max_warp=0.2, p_affine=0.75)
    d = {k: v.numpy() for k, v in augment.affine_draws(tf.constant([5, 6], tf.int64), 4000, p).items()}
    assert set(np.unique(d["flip"])) == {-1.0, 1.0} and abs((d["flip"] < 0).mean() - 0.5) < 0.03
    for k in ("theta", "xt", "yt"):
        assert abs((d[k] != 0).mean() - 0.75) < 0.03
    assert np.abs(d["theta"]).max() <= 10 and np.abs(d["xt"]).max() <= 0.2
    assert abs((d["zoom"] != 1).mean() - 0.75) < 0.03 and d["zoom"].min() >= 1 and d["zoom"].max() <= 1.1
    assert np.corrcoef(d["xt"] != 0, d["yt"] != 0)[0, 1] < 0.1  # independent coins
    off = augment.affine_draws(tf.constant([5, 6], tf.int64), 100,
                               AugParams(flip=False, max_rotate=0, max_zoom=1.0, max_warp=0))
    assert all((off[k].numpy() == v).all() for k, v in (("flip", 1), ("theta", 0), ("zoom", 1), ("xt", 0)))


def test_lighting_matches_fastai_formula_and_draws():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (3, 5, 5, 3)).astype(np.float32)
    x[0, 0, 0] = [0.0, 1.0, 0.5]
    bright = np.array([0.5, 0.42, 0.58], np.float32)
    contrast = np.array([1.0, 0.8, 1.2], np.float32)
    ours = augment.apply_lighting(tf.constant(x), tf.constant(bright), tf.constant(contrast)).numpy()
    t = torch.tensor(x).clamp(1e-7, 1 - 1e-7)
    logit = lambda v: -(1 / v - 1).log()
    ref = torch.sigmoid((logit(t) + logit(torch.tensor(bright))[:, None, None, None])
                        * torch.tensor(contrast)[:, None, None, None]).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(ours[0], np.clip(x[0], 1e-7, 1 - 1e-7), atol=1e-5)  # neutral draw = identity
    b, c = (v.numpy() for v in augment.lighting_draws(tf.constant([1, 1], tf.int64), 4000, 0.2, 0.75))
    assert abs((b != 0.5).mean() - 0.75) < 0.03 and b.min() >= 0.4 and b.max() <= 0.6
    assert abs((c != 1).mean() - 0.75) < 0.03 and c.min() >= 0.8 - 1e-6 and c.max() <= 1 / 0.8 + 1e-6


def test_flip_only_when_augment_off():
    x = tf.constant(np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3)).astype(np.float32))
    out = augment.augment_batch(x, tf.constant([9, 9], tf.int64), AugParams(size=8, augment=False, flip=True))
    out, x = out.numpy(), x.numpy()
    same = [np.array_equal(o, i) for o, i in zip(out, x, strict=True)]
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and 0 < sum(mirrored) < 16
    none = augment.augment_batch(tf.constant(x), tf.constant([9, 9], tf.int64),
                                 AugParams(size=8, augment=False, flip=False))
    assert np.array_equal(none.numpy(), x)


def test_augment_params_validation_names_field(data_config):
    with pytest.raises(ValueError, match="data.min_scale"):
        AugParams.from_config(data_config(min_scale=0.0))
    with pytest.raises(ValueError, match="data.p_affine"):
        AugParams.from_config(data_config(p_affine=1.5))
