"""Linear probe (``train.recipe = "linear_probe"``): the frozen body's features computed once, the head trained on
them.

big_vision's linear / few-shot evaluators fit a classifier on frozen features; this is that honest fast baseline
among jaxtl's recipes. The body runs once, in eval mode (its running BatchNorm statistics), over this process's
training and validation images with the *validation* transform (no augmentation), and each image becomes its
pooled feature vector (the head's parameter-free pooling: fastai's concat pool, ``2C``, or torchvision's mean,
``C``; ``ResNet.pooled``). The head then trains on those vectors with fastai's ``fit_one_cycle`` (``train.epochs``,
``train.lr``, ``pct_start`` / ``div``: one_cycle's defaults) through the same Learner, loop and steps as every
recipe: a Learner whose model is the head alone (``jaxtl.models.HeadOnly``) and whose data is the feature arrays
(:class:`FeatureData`). It shares the run's work dir: the table, ``history.csv``, TensorBoard and checkpoints (of
the head; a resume is exact, the features are recomputed). At the end its head replaces the full model's, so
``validate``, ``predict``, ``train.tta``, the report and the export see the whole network as after any recipe.

What the recipe does not read: MixUp / CutMix (they mix images; the features are computed once), the data
augmentation fields (unless ``train.tta`` > 0, which uses them after the fit), ``data.size_schedule`` and
``train.train_bn`` (the body never trains). Label smoothing, EMA (of the head), accumulation, the optimiser and
one-cycle fields apply as in ``one_cycle``.

Features live in memory (float32 ``N x P``: 7,400 Pets images through ResNet-50's concat pool are 121 MB); above
``IN_MEMORY_BYTES`` per split they stream to a raw float32 file in the work dir (``probe_features/``) and the
batches read it as a ``numpy.memmap``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtl.models import head_only
from jaxtl.train import make_features_step

IN_MEMORY_BYTES = 2 * 2**30  # per split; larger feature arrays go to a memmap in the work dir
STREAM_PROBE = 6  # the feature order's random stream (the image pipeline uses 1..5, jaxtl.data.streams)


class FeatureData:
    """Pooled features with the batch interface the Learner reads from a ``DataBundle``.

    ``train``: ``(x (N, P) float32, y (N,) int32)`` of this process (padding removed); ``valid``: ``(x, y, mask)``
    padded to the same number of batches on every process, as ``DataBundle.valid_batches``. Epoch ``e``'s order
    is a permutation drawn from ``(seed, process, e)``, so any (epoch, batch) can be asked for again (exact resume).
    """

    aug = None  # no image transform: the steps take the features as they are (float32)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, train: tuple[np.ndarray, np.ndarray], valid: tuple[np.ndarray, np.ndarray, np.ndarray],
                 classes: list[str], batch_size: int, steps_per_epoch: int, num_valid: int, seed: int,
                 process_index: int) -> None:
        self.train_x, self.train_y = train
        self.valid_x, self.valid_y, self.valid_mask = valid
        self.classes, self.batch_size, self.steps_per_epoch = list(classes), batch_size, steps_per_epoch
        self.num_train, self.num_valid = len(self.train_y), num_valid
        self.seed, self.process_index = seed, process_index
        if steps_per_epoch * batch_size > len(self.train_y):
            raise ValueError(f"{len(self.train_y)} training feature rows on this process, fewer than {steps_per_epoch}"
                             f" batches of {batch_size}")

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        b = self.batch_size
        order = np.random.default_rng([self.seed, STREAM_PROBE, self.process_index, epoch]).permutation(
            len(self.train_y))
        for i in range(start_step, self.steps_per_epoch):
            idx = np.sort(order[i * b:(i + 1) * b])  # ascending: a memmap reads forward
            yield {"image": np.asarray(self.train_x[idx]), "label": self.train_y[idx]}

    def valid_batches(self, epoch: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        del epoch  # one size: the features
        b = self.batch_size
        for i in range(0, len(self.valid_y), b):
            yield {"image": np.asarray(self.valid_x[i:i + b]), "label": self.valid_y[i:i + b],
                   "mask": self.valid_mask[i:i + b]}


def extract(learn: Any, batches: Iterable[dict[str, np.ndarray]], spill: Path | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features (N, P) float32, labels (N,), mask (N,))`` of image batches through ``learn``'s body (eval mode,
    the weights validation uses) and the head's pooling. Once they pass ``IN_MEMORY_BYTES`` (and ``spill`` is
    given) the rows go on to the raw float32 file ``spill`` as they come, read back as a read-only memmap."""
    step = learn.par.predict_step(make_features_step(learn.model, learn.transform))
    variables = learn._placed_eval_variables()
    held: list[np.ndarray] = []
    ys, ms, n, f = [], [], 0, None
    try:
        for b in batches:
            x = np.ascontiguousarray(learn.par.local_outputs(step(variables, learn.par.put_batch(
                {"x": b["image"]})["x"])), np.float32)
            if f is None and spill is not None and (n + len(x)) * x.shape[1] * 4 > IN_MEMORY_BYTES:
                spill.parent.mkdir(parents=True, exist_ok=True)
                f = open(spill, "wb")  # closed below, after the last batch
                for h in held:
                    f.write(h.tobytes())
                held = []
            if f is None:
                held.append(x)
            else:
                f.write(x.tobytes())
            n += len(x)
            ys.append(np.asarray(b["label"], np.int32))
            ms.append(np.asarray(b["mask"], bool))
    finally:
        if f is not None:
            f.close()
    if not ys:
        return np.zeros((0, 1), np.float32), np.zeros((0,), np.int32), np.zeros((0,), bool)
    y, m = np.concatenate(ys), np.concatenate(ms)
    if f is None:
        return np.concatenate(held), y, m
    return np.memmap(spill, np.float32, "r", shape=(n, os.path.getsize(spill) // (4 * n))), y, m


def feature_data(learn: Any) -> FeatureData:
    """Run the body once over the training and validation images (validation transform)."""
    d = learn.data
    spill = None if learn.workdir is None else learn.workdir / "probe_features" / f"p{jax.process_index()}"
    tx, ty, tm = extract(learn, d.train_eval_batches(), spill and spill.with_suffix(".train.f32"))
    n = int(tm.sum())  # the padding rows are the last ones
    train = (tx[:n], ty[:n])
    valid = extract(learn, d.valid_batches(), spill and spill.with_suffix(".valid.f32"))
    return FeatureData(train, valid, d.classes, d.batch_size, d.steps_per_epoch, d.num_valid, learn.config.seed,
                       jax.process_index())


def head_variables(variables: dict[str, Any]) -> dict[str, Any]:
    """The ``{"head": ...}`` part of each collection of the full model's variables (``{}`` where it has none)."""
    return {k: {"head": v["head"]} if "head" in v else {} for k, v in variables.items()}


def fit(learn: Any, resume: bool = False) -> Any:
    """The recipe on ``learn`` (a full-model Learner, body frozen): features, the head's one-cycle, then the trained
    head (and its EMA) put back into ``learn``. Returns the probe's Learner (its history is ``learn.history``)."""
    from jaxtl.config import recipe_value

    t, cfg = learn.config.train, learn.config.copy_and_resolve_references()
    cfg.train.mixup_alpha = cfg.train.cutmix_alpha = 0.0  # not read by this recipe (config.ignored_run_fields)
    data = feature_data(learn)
    learn.data.size_schedule = ()  # not read by this recipe (a warning says so): the full model validates at data.size
    probe = type(learn)(head_only(learn.model), head_variables(learn.variables), data, cfg, None)  # a Learner
    # the run's work dir, history writer, checkpoints and stop requests (a signal handler, request_stop) are the
    # full Learner's
    probe.workdir, probe._ckpt, probe._logger = learn.workdir, learn._ckpt, learn._logger
    learn._begin(False)  # (clears an earlier fit's stop request)
    probe.request_stop, probe._loop.stop_requested = learn.request_stop, learn._stop_agreed
    probe.fit_one_cycle(int(t.epochs), float(t.lr), div=float(recipe_value(cfg, "div")),
                        div_final=float(t.div_final), pct_start=float(recipe_value(cfg, "pct_start")),
                        moms=tuple(t.moms), resume=resume)
    put_head(learn, probe)
    return probe


def put_head(learn: Any, probe: Any) -> None:
    """Copy the probe's head (parameters, BatchNorm statistics, EMA) and run record into the full Learner."""
    st = learn.par.get_state(learn.state)
    head = learn.par.get_state(probe.state)

    def merged(full: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
        return {**full, **{k: v for k, v in part.items() if v}}

    new = {"params": merged(st.params, head.params), "batch_stats": merged(st.batch_stats, head.batch_stats)}
    if st.ema is not None and head.ema is not None:
        new["ema"] = {k: merged(st.ema[k], head.ema[k]) for k in ("params", "batch_stats")}
    learn.state = learn.par.put_state(st.replace(**new))
    learn.history, learn.step_losses, learn.global_step = probe.history, probe.step_losses, probe.global_step
    learn.data_epoch, learn.best_metric = probe.data_epoch, probe.best_metric
    learn.stopped_early, learn.stop_reason, learn.columns = probe.stopped_early, probe.stop_reason, probe.columns
    learn._loop.timings.update(probe._loop.timings)
    learn._validate_s += probe._validate_s
    learn._loop.first_step_done_at = probe._loop.first_step_done_at
