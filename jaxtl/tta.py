"""Test-time augmentation: fastai's ``Learner.tta(n=4, beta=0.25)``.

fastai (2.8, ``Learner.tta``): ``n`` passes over the validation set with the training transforms
(``dl.dataset.set_split_idx(0)``: RandomResizedCrop and the batch transforms), their softmax probabilities averaged
(``aug``), one plain pass (``plain``, the validation transform), then ``torch.lerp(aug, plain, beta)`` =
``(1 - beta) * aug + beta * plain``; ``beta=None`` returns ``(aug, plain)``. Here the passes are
``DataBundle.tta_batches(i)`` (keys from the seed, the pass and the position: the same augmentations every time)
through ``jaxtl.train.make_tta_step``, with the weights validation uses (the EMA with ``train.eval_ema``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxtl.train import make_tta_step


def tta(learn: Any, n: int = 4, beta: float | None = 0.25) -> tuple[Any, np.ndarray]:
    """``(probs (N, C), labels (N,))`` for this process's validation images in ``data.valid_items`` order
    (``probs`` = ``(aug, plain)`` when ``beta`` is None)."""
    if int(n) < 1:
        raise ValueError(f"tta needs n >= 1 augmented passes, got n={n}")
    if beta is not None and not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"tta's beta blends the augmented and plain predictions and must be in [0, 1], got {beta}")
    plain, labels = learn.get_valid_preds()
    if getattr(learn, "_tta_step", None) is None:
        learn._tta_step = learn.par.predict_step(make_tta_step(learn.model, learn.transform))
    variables = learn._placed_eval_variables()
    aug = np.zeros(plain.shape, np.float64)
    for i in range(int(n)):
        probs, masks = [], []
        for b in learn.data.tta_batches(i):
            masks.append(np.asarray(b.pop("mask"), bool))
            probs.append(learn.par.local_outputs(learn._tta_step(variables, learn.par.put_batch(b))))
        aug += np.concatenate(probs)[np.concatenate(masks)] if probs else 0.0
    aug = (aug / int(n)).astype(np.float32)
    if beta is None:
        return (aug, plain), labels
    return ((1.0 - float(beta)) * aug + float(beta) * plain).astype(np.float32), labels


def after_fit(learn: Any, n: int, beta: float = 0.25) -> dict[str, float]:
    """``train.tta`` = n > 0: after the recipe's last epoch, :func:`tta` with fastai's default ``beta``; its
    metrics go into the epoch table (a row ``tta`` under the last epoch's, which is the same model without TTA)
    and ``history.csv``, and come back as ``{"tta_<metric>": value}``. Nothing when off, stopped early or
    without validation images."""
    import time

    from jaxtl import parallel, progress

    if n <= 0 or learn.stopped_early or int(getattr(learn.data, "num_valid", 0)) == 0:
        return {}
    t0 = time.perf_counter()
    probs, labels = tta(learn, n, beta)
    p_true = probs[np.arange(len(labels)), labels]
    top5 = (np.argsort(-probs, axis=1)[:, :5] == labels[:, None]).any(1)
    local = np.array([-np.log(np.maximum(p_true, 1e-12)).sum(), (probs.argmax(1) != labels).sum(), top5.sum(),
                      len(labels)], np.float64)
    loss, wrong, in_top5, count = parallel.allgather(local).sum(0)  # every process's validation share
    row: dict[str, Any] = {"epoch": f"tta({n})", "valid_loss": loss / count, "error_rate": wrong / count,
                           "accuracy": 1.0 - wrong / count}
    if "top_5_accuracy" in learn.columns:
        row["top_5_accuracy"] = in_top5 / count
    row["time"] = progress.format_time(time.perf_counter() - t0)
    progress.EpochTable(learn.columns, enabled=learn.is_main).write(row)
    if learn._logger is not None:
        learn._logger.write_csv(list(learn.history) + [row], learn.columns)
    return {f"tta_{k}": float(v) for k, v in row.items() if k not in ("epoch", "time")}


def predict_tta(predictor: Any, images: list[Any], n: int, aug: Any, beta: float | None = 0.25, seed: int = 0,
                batch_size: int = 32) -> Any:
    """``python -m jaxtl.predict --tta n``: :func:`tta`'s blend for image files (paths or bytes) with a
    :class:`jaxtl.predict.Predictor`: pass ``i`` crops image ``j`` with the key ``(seed, STREAM_TTA, i, j)`` and
    draws the batch transforms (``aug``: the run's ``AugParams``) with ``(seed, STREAM_TTA_BATCH, i, chunk)``.
    ``beta=None``: ``(aug, plain)``."""
    import jax

    from jaxtl.data import augment, decode, streams
    from jaxtl.data.tf_import import tf
    from jaxtl.device_augment import BatchTransform, static_flags
    from jaxtl.train import make_tta_step

    if int(n) < 1:
        raise ValueError(f"--tta needs n >= 1 augmented passes, got {n}")
    plain = predictor.probabilities(np.stack([predictor.preprocess(x) for x in images]), batch_size)
    rgb = [decode.decode_rgb(tf.constant(decode.load_bytes(x))) for x in images]
    step = jax.jit(make_tta_step(predictor.model, BatchTransform(predictor.mean, predictor.std,
                                                                   **static_flags(aug))))
    size, aug_sum = int(predictor.size), np.zeros(plain.shape, np.float64)
    for i in range(int(n)):
        pixels = []
        for j, x in enumerate(rgb):
            key = tf.constant(streams.key(seed, streams.STREAM_TTA, i, j))
            box = augment.random_resized_crop_params(key, tf.shape(x)[0], tf.shape(x)[1], aug.min_scale)
            pixels.append(augment.resize_uint8(decode.crop_box(x, box), size, size).numpy())
        for c in range(0, len(pixels), batch_size):
            chunk = np.stack(pixels[c:c + batch_size])
            pad = batch_size - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, size, size, 3), np.uint8)]) if pad else chunk
            key = tf.constant(streams.key(seed, streams.STREAM_TTA_BATCH, i, c // batch_size))
            draws = {k: v.numpy() for k, v in augment.batch_aug_params(key, batch_size, aug).items()}
            probs = np.asarray(step(predictor.variables, {"image": chunk, **draws}))
            aug_sum[c:c + len(chunk) - pad] += probs[:batch_size - pad]
    mean = (aug_sum / int(n)).astype(np.float32)
    return (mean, plain) if beta is None else ((1.0 - beta) * mean + beta * plain).astype(np.float32)
