"""What the Learner's recipes hand to the one loop (``jaxtl.loop``): a one-cycle phase (``fit_one_cycle``, each
phase of ``fine_tune``) and the ``lr_find`` sweep, and the checkpoints of a phase (save, exact resume).

Each function takes the :class:`jaxtl.learner.Learner` whose run it advances (state, history, global step, data
epoch, smoothed loss, checkpointer); the Learner's public methods are the way in.

A phase: its trainable mask (``Learner.trainable_mask``, the one freezing object) goes to both the optimiser
(``jaxtl.optim.build_optimizer``) and the train step; the schedules live in the optimiser, so the step compiles
once per phase. ``on_loss`` keeps fastai's per-step record and stops on a non-finite loss; ``on_epoch_end``
validates, writes the table row, the CSV / TensorBoard scalars and the checkpoints.

lr_find: the same loop with an exponential lr schedule on a copy of the state, ``on_loss`` recording (lr,
smoothed loss) and stopping by ``schedules.lr_find_diverged``; no epoch end.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl import checkpoint, groups, loop, metrics, progress, schedules
from jaxtl.ema import Ema
from jaxtl.mix import Regularise
from jaxtl.train import make_train_step

PyTree = Any


def optimizer(learn: Any, group_lrs: Sequence[Any], momentum: Any, mask: PyTree, accumulate: bool = True) -> Any:
    """``build_optimizer`` from the config's ``optim`` section for one phase's lrs, momentum and mask; with
    ``train.accum_steps`` = k > 1 (and ``accumulate``) wrapped in ``optax.MultiSteps``: the mean gradient of k
    steps makes one update, so the schedules (inside) count optimiser steps."""
    from jaxtl.optim import build_optimizer

    tx = build_optimizer(learn.config.optim, learn.variables["params"], list(group_lrs), momentum, mask,
                         keep_state_structure=not bool(learn.config.train.reset_opt_on_freeze))
    k = accum_steps(learn)
    return optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation() if accumulate and k > 1 else tx


def accum_steps(learn: Any) -> int:
    return int(learn.config.train.accum_steps)


def train_step(learn: Any, tx: Any, mask: PyTree, accumulate: bool = True
               ) -> Callable[[PyTree, Any], tuple[PyTree, dict[str, Any]]]:
    """The placed train step of a phase (or lr_find) with the config's label smoothing / MixUp / CutMix
    (``jaxtl.mix``) and weight EMA (``jaxtl.ema``). With ``train.mix_off_epoch`` > 0 (timm's
    ``mixup_off_epoch``), a second step without mixing serves the data epochs from that one on (compiled when
    first used)."""
    reg = Regularise.from_config(learn.config.train)

    def build(r: Regularise) -> Callable[[PyTree, Any], tuple[PyTree, dict[str, Any]]]:
        return learn.par.train_step(make_train_step(learn.model, tx, mask, axis_name=learn.par.model_axis_name,
                                                    transform=learn.transform, regularise=r,
                                                    ema=Ema.from_config(learn.config.train),
                                                    accum_steps=accum_steps(learn) if accumulate else 1))

    off = int(learn.config.train.mix_off_epoch)
    if not (reg.mixes and off > 0):
        return build(reg)
    mixing, plain = build(reg), build(reg.without_mixing())
    return lambda state, batch: (mixing if learn.data_epoch < off else plain)(state, batch)


def fit_phase(learn: Any, epochs: int, lrs: Sequence[float], div: float, div_final: float, pct_start: float,
              moms: tuple[float, ...]) -> list[dict[str, Any]]:
    """One ``fit_one_cycle``: schedules, mask, optimiser and step, then the loop with this phase's hooks.
    Returns the phase's history rows."""
    phase, meta = learn.phase, learn._resume_meta
    learn.phase += 1
    spe = int(learn.data.steps_per_epoch)
    if (meta is not None and meta["phase"] > phase) or learn.stopped_early or epochs * spe < 1:
        return []  # (a phase finished before the checkpoint is skipped: a later phase restores its state)
    k = accum_steps(learn)
    if epochs * spe < k:
        raise ValueError(f"train.accum_steps={k} is more than the {epochs * spe} step(s) of this phase ({epochs} "
                         f"epoch(s) x {spe}): no optimiser step would be taken; lower train.accum_steps")
    # one-cycle over the phase's optimiser steps (k batches each); a last partial group is carried over
    lr_sched, mom_sched = schedules.one_cycle(epochs * spe // k, list(lrs), div, div_final, pct_start, moms)
    mask = learn.trainable_mask()
    tx = optimizer(learn, schedules.split_schedule(lr_sched, groups.N_GROUPS), mom_sched, mask)
    start = (0, 0)
    if meta is not None:
        checkpoint.check_same_phase(meta, phase, epochs, learn.n_frozen_groups)
        start = restore(learn, meta, tx)
    else:
        prepare_opt_state(learn, tx)
        learn._smooth.reset()  # fastai resets the smoothed loss at each fit
    learn._train_step = train_step(learn, tx, mask)
    # the head lr each batch is trained with (the lr of the optimiser step its gradient goes into)
    head_lrs = np.asarray(jax.jit(jax.vmap(lr_sched))(jnp.arange(epochs * spe) // k))[:, -1]
    plan = loop.Plan(epochs, spe, head_lrs, start, int(learn.config.train.max_steps))
    rows: list[dict[str, Any]] = []
    table = progress.EpochTable(learn.columns, enabled=learn.is_main)
    step0, gstep0 = start[0] * spe + start[1], learn.global_step

    def on_loss(run_step: int, loss: float, lr: float) -> str | None:
        gstep = gstep0 + run_step - step0 + 1
        if not math.isfinite(loss):
            learn.stop_reason = (f"loss is {loss} at step {gstep} (phase {phase}, phase step {run_step}) with lr "
                                 f"{lr:.3g} (head group); training stopped, {_kept(learn)}. Lower the learning "
                                 "rate (train.lr / lr_max).")
            return "diverged"
        learn.global_step = gstep
        learn.step_losses.append(loss)
        if learn._logger is not None:
            learn._logger.log_step(gstep, loss, lr)
        return None

    def on_epoch_end(state: PyTree, end: loop.EpochEnd) -> str | None:
        learn.state = state
        finished = end.done >= spe
        pos = (end.epoch + 1, 0) if finished else (end.epoch, end.done)
        if not finished:  # interrupted or max_steps: checkpoint the exact position
            save(learn, phase, epochs, pos)
            if end.reason == "interrupted":
                return end.reason
        row = epoch_row(learn, phase, end.seconds)
        rows.append(row)
        table.write(row)
        if int(getattr(learn.data, "num_valid", 0)) > 0 and not math.isfinite(row["valid_loss"]):
            # the epoch's last updates diverged: do not save a checkpoint that would pose as the last good one
            learn.stop_reason = (f"validation loss is {row['valid_loss']} at step {learn.global_step} (end of an "
                                 f"epoch, phase {phase}); training stopped, {_kept(learn)}. Lower the learning "
                                 "rate (train.lr / lr_max).")
            return "diverged"
        if finished:
            save(learn, phase, epochs, pos, row=row)
        return end.reason

    with loop.stop_on_signals(learn.request_stop, only_if_unhandled=True):
        learn.state, reason = learn._loop.run(learn._train_step, learn.state,
                                              lambda e, s: learn.data.train_batches(learn.data_epoch, s), plan,
                                              learn._smooth, on_loss, on_epoch_end,
                                              label=lambda e: f"epoch {learn.data_epoch}")
    if learn._ckpt is not None:
        learn._ckpt.wait()  # the phase's checkpoint writes overlapped its epochs; on disk before the fit returns
    if reason in ("diverged", "interrupted"):
        learn.stopped_early = True
        message = learn.stop_reason
        if reason == "interrupted":
            learn.stop_reason = "interrupted"
            where = f"; checkpoint saved in {learn.workdir}" if learn._ckpt else " (no checkpoint: no work dir)"
            message = f"stopped at step {learn.global_step}{where}"
        if learn.is_main:
            print(f"jaxtl: {message}", file=sys.stderr, flush=True)
    return rows


def lr_find(learn: Any, start_lr: float, end_lr: float, num_it: int, stop_div: bool) \
        -> tuple[list[float], list[float], str | None]:
    """fastai's ``LRFinder`` run: (lrs, smoothed losses, why it ended). The Learner's state is untouched."""
    n_it = max(int(num_it), 6)
    if int(learn.config.train.max_steps):
        n_it = min(n_it, int(learn.config.train.max_steps))
    sched = schedules.lr_find_schedule(start_lr, end_lr, num_it)
    mask = learn.trainable_mask()
    tx = optimizer(learn, [sched] * groups.N_GROUPS, None, mask, accumulate=False)  # the sweep: one lr per batch
    step = train_step(learn, tx, mask, accumulate=False)
    spe = int(learn.data.steps_per_epoch)
    plan = loop.Plan(-(-n_it // spe), spe, np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(n_it))), (0, 0), n_it)
    smooth, lrs, losses, best = metrics.SmoothLoss(), [], [], [math.inf]

    def on_loss(run_step: int, loss: float, lr: float) -> str | None:
        lrs.append(lr)
        losses.append(smooth.value)
        if smooth.value < best[0]:  # NaN < x is False: as fastai, a NaN is never the best
            best[0] = smooth.value
        return "diverged" if stop_div and schedules.lr_find_diverged(smooth.value, best[0]) else None

    one = learn.par.get_state(learn.state)
    state = learn.par.put_state(one.replace(opt_state=tx.init(one.params)))  # fresh copies: the step donates them
    with loop.stop_on_signals(learn.request_stop, only_if_unhandled=True):
        state, reason = learn._loop.run(step, state, lambda e, s: learn.data.train_batches(learn.data_epoch + e, s),
                                        plan, smooth, on_loss, label=lambda e: "lr_find")
    del state
    return lrs, losses, reason


# ---------------------------------------------------------------------------------------------- helpers
def _kept(learn: Any) -> str:
    last = learn._ckpt.latest_step() if learn._ckpt else None
    return (f"the last good checkpoint (step {last}) is kept in {learn.workdir / 'checkpoints'}"
            if last is not None else "no checkpoint was saved")


def prepare_opt_state(learn: Any, tx: Any) -> None:
    """fastai keeps the optimiser state across fit calls and clears it when the frozen set changes."""
    from jaxtl.optim import restart_schedules

    if learn.state.opt_state is None or learn._reset_opt:
        opt_state = fresh_opt_state(learn, tx)
    else:
        opt_state = restart_schedules(learn.state.opt_state)
    learn.state = learn.state.replace(opt_state=opt_state)
    learn._reset_opt = False


def fresh_opt_state(learn: Any, tx: Any) -> PyTree:
    # One jitted program (in JAX's persistent cache) instead of one eager dispatch per leaf: faster warm starts.
    return learn.par.put_state(jax.jit(tx.init)(learn.variables["params"]))


def epoch_row(learn: Any, phase: int, seconds: float) -> dict[str, Any]:
    """Validate, append the epoch's history row, advance the data epoch, write CSV and TensorBoard."""
    row: dict[str, Any] = {"phase": phase, "epoch": learn.data_epoch, "train_loss": learn._smooth.value}
    if "size" in learn.columns:  # data.size_schedule: the size this epoch trained and validates at
        row["size"] = learn.data.size_at(learn.data_epoch)
    row.update(learn.validate())
    row["time"], row["seconds"] = progress.format_time(seconds), round(seconds, 3)
    learn.history.append(row)
    learn.data_epoch += 1
    if learn._logger is not None:
        learn._logger.write_csv(learn.history, learn.columns)
        learn._logger.log_epoch(row, learn.global_step)
    return row


def save(learn: Any, phase: int, epochs: int, pos: tuple[int, int], row: dict[str, Any] | None = None) -> None:
    """Checkpoint the state at ``pos`` (next epoch, next batch of the phase); also as the best one when the
    finished epoch's ``row`` improves ``train.metric``."""
    metric = str(learn.config.train.metric)
    is_best = row is not None and metric in row and metrics.is_better(metric, float(row[metric]), learn.best_metric)
    if is_best:
        learn.best_metric = float(row[metric])
    if learn._ckpt is None:
        return
    meta = checkpoint.jsonable({
        "version": checkpoint.VERSION, "phase": phase, "phase_epochs": epochs, "epoch": pos[0],
        "step_in_epoch": pos[1], "data_epoch": learn.data_epoch, "global_step": learn.global_step,
        "n_frozen_groups": learn.n_frozen_groups, "history": list(learn.history),
        "smooth_loss": learn._smooth.state_dict(), "step_losses": learn.step_losses,
        "best_metric": learn.best_metric, "metric": metric, "classes": learn.classes,
        "config": learn.config.to_dict() if hasattr(learn.config, "to_dict") else {}})
    state = learn.par.get_state(learn.state)
    learn._ckpt.save(learn.global_step, state, meta, best=is_best)  # asynchronous; one copy when best


def load_weights(learn: Any, best: bool) -> None:
    """``Learner.load``: params, BatchNorm statistics and (when on) the EMA from the best (else latest) checkpoint,
    cast to the Learner's dtypes; the parts a checkpoint lacks (the body, after ``linear_probe``) stay as they are."""
    if learn._ckpt is None:
        raise ValueError("load needs a work dir with checkpoints")
    raw = learn._ckpt.restore_state(None, best=best and learn._ckpt.latest_step(best=True) is not None)
    like = learn.variables

    def cast(got: dict[str, PyTree]) -> dict[str, PyTree]:  # a linear probe's checkpoints hold {"head": ...} only
        return {k: {**like[k], **{part: jax.tree.map(lambda t, x: np.asarray(x, t.dtype), like[k][part], sub)
                                  for part, sub in got[k].items()}} for k in like}

    out = cast(raw)
    if learn.state.ema is not None and raw.get("ema") is not None:
        out["ema"] = cast(raw["ema"])
    learn.state = learn.state.replace(**learn.par.put_state(out))


def restore(learn: Any, meta: dict[str, Any], tx: Any) -> tuple[int, int]:
    """Load the checkpoint ``meta`` describes into ``learn``; returns the (epoch, batch) of the phase to go on at."""
    target = learn.par.get_state(learn.state.replace(opt_state=fresh_opt_state(learn, tx)))
    learn.state = learn.par.put_state(learn._ckpt.restore_state(target, step=int(meta["global_step"])))
    learn._reset_opt, learn._resume_meta = False, None
    learn.global_step, learn.data_epoch = int(meta["global_step"]), int(meta["data_epoch"])
    learn.history, learn.best_metric = list(meta["history"]), meta["best_metric"]
    learn.step_losses = [float(x) for x in meta["step_losses"]]
    learn._smooth.load_state_dict(meta["smooth_loss"])
    if learn.is_main:
        print(f"jaxtl: resumed from step {learn.global_step} (phase {meta['phase']}, epoch {meta['epoch']}, "
              f"batch {meta['step_in_epoch']})", file=sys.stderr, flush=True)
    return int(meta["epoch"]), int(meta["step_in_epoch"])
