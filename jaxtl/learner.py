"""``Learner``: fastai's notebook API over the pure jaxtl engine.

::

    learn = Learner.from_config(config, workdir="runs/pets")   # data, model, pretrained body (frozen)
    learn.lr_find()                                            # -> LRFindResult(valley=...), lr_find.png
    learn.fine_tune(1)                                         # fastai's recipe: frozen epoch, then unfrozen
    learn.validate(); learn.predict(["cat.jpg"]); learn.history_table()

Each ``fit_one_cycle`` call is one *phase*: its optimiser and jitted step are built once (schedules read their
position from the optimiser state, so nothing recompiles between epochs). Per epoch the Learner prints a row of
fastai's table, rewrites ``history.csv``, logs TensorBoard scalars and saves an orbax checkpoint (and the best one
by ``train.metric``). ``fit_one_cycle(..., resume=True)`` / ``fine_tune(..., resume=True)`` continue from the
latest checkpoint: phase, schedule position, data order, RNG, history and smoothed loss, so the final parameters
equal an uninterrupted run's.

Stops: ``request_stop()`` (e.g. from a SIGINT handler; installed automatically during a fit when nothing else
handles SIGINT) finishes the current step, saves a checkpoint and returns with ``stopped_early`` set and
``stop_reason == "interrupted"``. A NaN/inf loss stops without saving (the last good checkpoint stays) with
``stop_reason`` naming the step and learning rate. ``train.max_steps`` ends each fit after that many steps (the
partial epoch is validated and checkpointed; not an early stop).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtl import groups, metrics, parallel, progress, schedules
from jaxtl.checkpoint import Checkpointer
from jaxtl.train import TrainState, make_eval_step, make_predict_step, make_train_step

PyTree = Any
LRSpec = float | slice | Sequence[float] | None
CHECKPOINT_VERSION = 1


@dataclass
class LRFindResult:
    """``lr_find``'s answer: fastai's ``valley`` suggestion plus the recorded sweep (lr, smoothed loss)."""

    valley: float
    lrs: list[float] = field(repr=False)
    losses: list[float] = field(repr=False)
    plot: Path | None = None


class Learner:
    """Model + variables + data + config, trained with fastai's recipes. See the module docstring."""

    def __init__(self, model: Any, variables: Mapping[str, PyTree], data: Any, config: ml_collections.ConfigDict,
                 workdir: str | Path | None = None) -> None:
        self.config = config
        self.data = data
        self.workdir = Path(workdir) if workdir is not None else None
        t = config.train
        self.par = parallel.DataParallel(str(t.parallel))
        self.is_main = jax.process_index() == 0
        self.global_batch = int(data.batch_size) * jax.process_count()
        self.par.check_batch_size(self.global_batch)
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(str(t.precision))
        if dtype is None:
            raise ValueError(f"config field train.precision={t.precision!r} is not valid; choose float32 or bfloat16")
        self.model = model.clone(dtype=dtype, axis_name=self.par.model_axis_name)
        self.classes = list(data.classes)
        self.num_classes = len(self.classes)
        self.columns = progress.columns_for(self.num_classes)
        metrics.is_better(str(t.metric), 0.0, None)  # validates train.metric
        if str(t.metric) == "top_5_accuracy" and self.num_classes <= 5:
            raise ValueError(f"config field train.metric='top_5_accuracy' is computed only with more than 5 classes; "
                             f"this data has {self.num_classes}: choose error_rate, accuracy, valid_loss or train_loss")
        rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 1)
        self.state = self.par.put_state(TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                                   batch_stats=variables["batch_stats"], opt_state=None, rng=rng))
        self.n_frozen_groups = 0
        self._reset_opt = True
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.global_step = 0  # optimiser steps over the Learner's life (checkpoint ids)
        self.data_epoch = 0  # training epochs started; the data order of an epoch is a function of this
        self.phase = 0  # index of the next fit_one_cycle call (resume matches phases by it)
        self.best_metric: float | None = None
        self.stopped_early = False
        self.stop_reason: str | None = None
        self._stop_requested = False
        self._resume_meta: dict[str, Any] | None = None
        self._smooth = metrics.SmoothLoss()
        self._ckpt: Checkpointer | None = None
        if self.workdir is not None and bool(t.checkpoint):
            self._ckpt = Checkpointer(self.workdir)
        self._logger = progress.HistoryLogger(self.workdir, enabled=self.is_main) if self.workdir else None
        self._eval = self.par.eval_step(make_eval_step(self.model, axis_name=self.par.model_axis_name))
        self._predict = self.par.predict_step(make_predict_step(self.model))
        self._train_step: Any = None
        # Wall seconds by activity over the Learner's life (for scripts/bench_e2e.py): waiting for the input
        # pipeline, the first step of each phase (trace + compile or cache load), later steps, validation.
        self.timings = {"data_wait": 0.0, "first_step": 0.0, "step": 0.0, "validate": 0.0}
        self.first_step_done_at: float | None = None  # time.time() when the first training step finished

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> Learner:
        """Data via ``build_data``, model via ``create_model`` (``num_classes = len(classes)``), weights from
        ``model.pretrained`` (body replaced, fresh head; the Learner starts frozen as fastai's ``vision_learner``)
        or a random initialisation."""
        from jaxtl.config import validate
        from jaxtl.data import build_data
        from jaxtl.models import create_model
        from jaxtl.run_setup import log, start_run

        validate(config)
        start_run(config, workdir)  # as jaxtl.main: compilation cache, train.log, config.json
        t = config.train
        parallel.DataParallel(str(t.parallel)).check_batch_size(int(t.batch_size))
        n_proc = jax.process_count()
        data = build_data(config.data, int(t.batch_size) // n_proc, int(config.seed), jax.process_index(), n_proc)
        log.info("data: %s", data.description)
        m = config.model
        model = create_model(m.arch, len(data.classes), m.head, zero_init_residual=bool(m.zero_init_residual),
                             head_dropout=float(m.head_dropout), kernels=str(m.kernels))
        size = min(int(data.size), 64)  # parameter shapes do not depend on the image size
        key = jax.random.PRNGKey(int(config.seed))
        if m.pretrained:
            from jaxtl.convert import init_with_pretrained, load_pretrained

            pre = load_pretrained(m.pretrained, m.arch, cache_dir=m.weights_dir or None)
            variables = init_with_pretrained(model, key, pre, m.head, size)  # the body is not initialised
        else:
            variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3)), train=False))(key)
        learn = cls(model, variables, data, config, workdir)
        if m.pretrained:
            learn.freeze()
        return learn

    # ------------------------------------------------------------------------------------------ freezing
    def freeze_to(self, n: int) -> None:
        """Freeze layer groups ``0 .. n-1`` (``n < 0`` counts from the end). Like fastai, this resets the optimiser
        state unless ``train.reset_opt_on_freeze`` is False."""
        self.n_frozen_groups = groups.n_frozen(n)
        if bool(self.config.train.reset_opt_on_freeze):
            self._reset_opt = True

    def freeze(self) -> None:
        """Train only the head (plus every BatchNorm when ``train.train_bn``)."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        self.freeze_to(0)

    @property
    def variables(self) -> dict[str, PyTree]:
        """Current ``{"params", "batch_stats"}`` (one replica, device arrays)."""
        st = self.par.get_state(self.state)
        return {"params": st.params, "batch_stats": st.batch_stats}

    def request_stop(self) -> None:
        """Ask the running fit to stop after the current step (checkpoint saved). Safe from a signal handler."""
        self._stop_requested = True

    def _stop_agreed(self, in_flight: Any = None) -> bool:
        """Whether to stop after this step. With several processes a signal may reach only some of them (or
        reach them at different steps), so the request is OR-ed over processes each step and all stop together
        (one tiny collective per step; none with one process). The agreement is a collective program of its own:
        it waits for the step ``in_flight`` first, so that it never runs beside another collective program
        (parallel.py, "One collective program at a time")."""
        if jax.process_count() > 1:
            jax.block_until_ready(in_flight)
            self._stop_requested = parallel.any_process(self._stop_requested)
        return self._stop_requested

    # ------------------------------------------------------------------------------------------ recipes
    def fit_one_cycle(self, epochs: int, lr_max: LRSpec = None, div: float = 25.0, div_final: float = 1e5,
                      pct_start: float = 0.25, moms: Sequence[float] = (0.95, 0.85, 0.95),
                      resume: bool = False) -> list[dict[str, Any]]:
        """fastai's ``fit_one_cycle``; ``lr_max`` a number, ``slice(hi)``, ``slice(lo, hi)`` or one lr per group
        (default ``train.lr``). Returns the history rows of this call."""
        self._begin(resume)
        lrs = groups.lr_for_groups(self.config.train.lr if lr_max is None else lr_max)
        return self._fit_phase(int(epochs), lrs, float(div), float(div_final), float(pct_start), tuple(moms))

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100.0,
                  pct_start: float = 0.3, div: float = 5.0, div_final: float = 1e5,
                  moms: tuple[float, float, float] = (0.95, 0.85, 0.95), resume: bool = False) -> list[dict[str, Any]]:
        """fastai's ``fine_tune``: ``freeze(); fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)``, then
        ``unfreeze(); fit_one_cycle(epochs, slice(base_lr/2/lr_mult, base_lr/2), pct_start, div)``; ``div_final``
        and ``moms`` go to both ``fit_one_cycle`` calls (fastai passes its ``**kwargs`` on)."""
        self._begin(resume)
        rows: list[dict[str, Any]] = []
        for ph in schedules.fine_tune_plan(int(epochs), float(base_lr), int(freeze_epochs), float(lr_mult),
                                           float(pct_start), float(div)):
            self.freeze_to(ph.n_frozen)
            rows += self._fit_phase(ph.epochs, list(ph.lrs), ph.div, float(div_final), ph.pct_start,
                                    tuple(float(m) for m in moms))
            if self.stopped_early:
                break
        return rows

    def _begin(self, resume: bool) -> None:
        self.stopped_early, self.stop_reason, self._stop_requested = False, None, False
        if resume:
            self.prepare_resume()

    def prepare_resume(self) -> dict[str, Any]:
        """Read the latest checkpoint's metadata; the following fit calls skip finished phases and continue the
        checkpointed one exactly. Raises FileNotFoundError when there is nothing to resume."""
        if self._ckpt is None:
            raise ValueError("resume needs a work dir with checkpoints: Learner(..., workdir=DIR) and "
                             "train.checkpoint=True")
        meta = self._ckpt.restore_meta()
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint in {self.workdir} has format version {meta.get('version')}, "
                             f"expected {CHECKPOINT_VERSION}")
        if meta["classes"] != self.classes:
            raise ValueError(f"the checkpoint in {self.workdir} was trained on classes {meta['classes']}, the data "
                             f"now has {self.classes}; resume with the same data (data.*) or a new work dir")
        self._resume_meta = meta
        return meta

    # ------------------------------------------------------------------------------------------ one phase
    def _optimizer(self, group_lrs: Sequence[Any], momentum: Any) -> Any:
        from jaxtl.optim import build_optimizer

        t = self.config.train
        return build_optimizer(self.config.optim, self.variables["params"], list(group_lrs), momentum,
                               self.n_frozen_groups, bool(t.train_bn),
                               keep_state_structure=not bool(t.reset_opt_on_freeze))

    def _fresh_opt_state(self, tx: Any) -> PyTree:
        # One jitted program (cached on disk) instead of one eager dispatch per leaf: faster warm starts.
        return self.par.put_state(jax.jit(tx.init)(self.variables["params"]))

    def _prepare_opt_state(self, tx: Any) -> None:
        """fastai keeps the optimiser state across fit calls and clears it when the frozen set changes."""
        from jaxtl.optim import restart_schedules

        if self.state.opt_state is None or self._reset_opt:
            opt_state = self._fresh_opt_state(tx)
        else:
            opt_state = restart_schedules(self.state.opt_state)
        self.state = self.state.replace(opt_state=opt_state)
        self._reset_opt = False

    def _fit_phase(self, epochs: int, lrs: Sequence[float], div: float, div_final: float, pct_start: float,
                   moms: tuple[float, ...]) -> list[dict[str, Any]]:
        phase = self.phase
        self.phase += 1
        meta = self._resume_meta
        if meta is not None and meta["phase"] > phase:
            return []  # finished before the checkpoint; its state is restored in a later phase
        if self.stopped_early:
            return []
        spe = int(self.data.steps_per_epoch)
        total = epochs * spe
        if total < 1:
            return []
        lr_sched, mom_sched = schedules.one_cycle(total, list(lrs), div, div_final, pct_start, moms)
        tx = self._optimizer(schedules.split_schedule(lr_sched, groups.N_GROUPS), mom_sched)
        head_lrs = np.asarray(jax.jit(jax.vmap(lr_sched))(jnp.arange(total)))[:, -1]
        start_epoch = start_step = 0
        if meta is not None:
            if meta["phase"] != phase:
                raise ValueError(f"the checkpoint is in phase {meta['phase']} but this recipe reached phase {phase}"
                                 " first; resume with the same recipe and config")
            start_epoch, start_step = self._restore(meta, tx, epochs)
        else:
            self._prepare_opt_state(tx)
            self._smooth.reset()  # fastai resets the smoothed loss at each fit
        mask = groups.trainable_mask(self.variables["params"], self.n_frozen_groups, bool(self.config.train.train_bn))
        self._train_step = self.par.train_step(make_train_step(self.model, tx, mask,
                                                               axis_name=self.par.model_axis_name))
        ctx = {"phase": phase, "epochs": epochs, "lrs": head_lrs, "spe": spe}
        with self._sigint_to_stop():
            return self._train_epochs(ctx, start_epoch, start_step)

    def _train_epochs(self, ctx: dict[str, Any], start_epoch: int, start_step: int) -> list[dict[str, Any]]:
        spe, epochs = ctx["spe"], ctx["epochs"]
        max_steps = int(self.config.train.max_steps)
        table = progress.EpochTable(self.columns, enabled=self.is_main)
        rows: list[dict[str, Any]] = []
        steps_run = 0
        for epoch in range(start_epoch, epochs):
            t0 = time.time()
            bar = progress.ProgressBar(spe, self.global_batch, f"epoch {self.data_epoch}", self.is_main, start_step)
            end_reason = None
            step_in_epoch = start_step
            pending: tuple[Any, int, int] | None = None
            t_wait = time.perf_counter()
            batches = iter(self.data.train_batches(self.data_epoch, start_step))  # builds the tf.data pipeline
            self.timings["data_wait"] += time.perf_counter() - t_wait
            try:
                while True:
                    t_wait = time.perf_counter()
                    batch = next(batches, None)
                    t_step = time.perf_counter()
                    self.timings["data_wait"] += t_step - t_wait
                    if batch is None:
                        break
                    self.state, out = self._train_step(self.state, self.par.put_batch(batch))
                    if steps_run == 0:  # the phase's first call traces + compiles (or loads from the cache)
                        jax.block_until_ready(out["loss"])
                        self.timings["first_step"] += time.perf_counter() - t_step
                        self.first_step_done_at = self.first_step_done_at or time.time()
                    else:
                        self.timings["step"] += time.perf_counter() - t_step
                    self.global_step += 1
                    steps_run += 1
                    phase_step = epoch * spe + step_in_epoch
                    step_in_epoch += 1
                    t_host = time.perf_counter()
                    if pending is not None and not self._consume(pending, ctx, bar):
                        end_reason = "diverged"
                        break
                    self.timings["step"] += time.perf_counter() - t_host  # waiting for the previous step's loss
                    pending = (out["loss"], phase_step, self.global_step)
                    if self._stop_agreed(out["loss"]):
                        end_reason = "interrupted"
                        break
                    if max_steps and steps_run >= max_steps and step_in_epoch < spe:
                        end_reason = "max_steps"
                        break
                t_host = time.perf_counter()
                if end_reason != "diverged" and pending is not None and not self._consume(pending, ctx, bar):
                    end_reason = "diverged"
                self.timings["step"] += time.perf_counter() - t_host  # the epoch's last step
            finally:
                bar.close()
            if end_reason == "diverged":
                self.stopped_early = True
                if self.is_main:
                    print(f"jaxtl: {self.stop_reason}", file=sys.stderr, flush=True)
                return rows
            finished = step_in_epoch >= spe
            pos = (epoch + 1, 0) if finished else (epoch, step_in_epoch)
            if end_reason == "interrupted" and not finished:
                self._save(ctx, pos)
                return self._interrupted(rows)
            if not finished:  # max_steps: checkpoint the exact position before the partial epoch's row
                self._save(ctx, pos)
            row = self._epoch_row(ctx["phase"], time.time() - t0)
            rows.append(row)
            table.write(row)
            if int(getattr(self.data, "num_valid", 0)) > 0 and not math.isfinite(row["valid_loss"]):
                # the epoch's last updates diverged: do not save a checkpoint that would pose as the last good one
                last = self._ckpt.latest_step() if self._ckpt else None
                keep = (f"the last good checkpoint (step {last}) is kept in {self.workdir / 'checkpoints'}"
                        if last is not None else "no checkpoint was saved")
                self.stop_reason = (f"validation loss is {row['valid_loss']} at step {self.global_step} (end of an "
                                    f"epoch, phase {ctx['phase']}); training stopped, {keep}. Lower the learning rate "
                                    "(train.lr / lr_max).")
                self.stopped_early = True
                if self.is_main:
                    print(f"jaxtl: {self.stop_reason}", file=sys.stderr, flush=True)
                return rows
            if finished:
                self._save(ctx, pos, row=row)
            if end_reason == "interrupted":  # on an epoch's last batch: the epoch was completed normally
                return self._interrupted(rows)
            start_step = 0
            if max_steps and steps_run >= max_steps:
                break
        return rows

    def _interrupted(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.stopped_early, self.stop_reason = True, "interrupted"
        where = f"; checkpoint saved in {self.workdir}" if self._ckpt else " (no checkpoint: no work dir)"
        if self.is_main:
            print(f"jaxtl: stopped at step {self.global_step}{where}", file=sys.stderr, flush=True)
        return rows

    def _consume(self, pending: tuple[Any, int, int], ctx: dict[str, Any], bar: progress.ProgressBar) -> bool:
        """Host side of one finished step (fetched one step late so the device queue stays full)."""
        loss_arr, phase_step, gstep = pending
        loss = self.par.scalar(loss_arr)
        lr = float(ctx["lrs"][min(phase_step, len(ctx["lrs"]) - 1)])
        if not math.isfinite(loss):
            last = self._ckpt.latest_step() if self._ckpt else None
            keep = (f"the last good checkpoint (step {last}) is kept in {self.workdir / 'checkpoints'}"
                    if last is not None else "no checkpoint was saved")
            self.stop_reason = (f"loss is {loss} at step {gstep} (phase {ctx['phase']}, phase step {phase_step}) "
                                f"with lr {lr:.3g} (head group); training stopped, {keep}. Lower the learning rate "
                                "(train.lr / lr_max).")
            return False
        self._smooth.update(loss)
        self.step_losses.append(loss)
        bar.update(self._smooth.value, lr)
        if self._logger is not None:
            self._logger.log_step(gstep, loss, lr)
        return True

    def _epoch_row(self, phase: int, seconds: float) -> dict[str, Any]:
        valid = self.validate()
        row: dict[str, Any] = {"phase": phase, "epoch": self.data_epoch, "train_loss": self._smooth.value}
        row.update(valid)
        row["time"] = progress.format_time(seconds)
        row["seconds"] = round(seconds, 3)
        self.history.append(row)
        self.data_epoch += 1
        if self._logger is not None:
            self._logger.write_csv(self.history, self.columns)
            self._logger.log_epoch(row, self.global_step)
        return row

    # ------------------------------------------------------------------------------------------ checkpoints
    def _meta(self, ctx: dict[str, Any], pos: tuple[int, int]) -> dict[str, Any]:
        history = list(self.history)
        return {
            "version": CHECKPOINT_VERSION, "phase": ctx["phase"], "phase_epochs": ctx["epochs"],
            "epoch": pos[0], "step_in_epoch": pos[1], "data_epoch": self.data_epoch,
            "global_step": self.global_step, "n_frozen_groups": self.n_frozen_groups,
            "history": history, "smooth_loss": self._smooth.state_dict(), "step_losses": self.step_losses,
            "best_metric": self.best_metric, "metric": str(self.config.train.metric), "classes": self.classes,
            "config": self.config.to_dict() if hasattr(self.config, "to_dict") else {},
        }

    def _save(self, ctx: dict[str, Any], pos: tuple[int, int], row: dict[str, Any] | None = None) -> None:
        """Checkpoint the state at ``pos`` (next epoch, next batch of the phase); also as the best one when the
        finished epoch's ``row`` improves ``train.metric``."""
        metric = str(self.config.train.metric)
        is_best = row is not None and metric in row and metrics.is_better(metric, float(row[metric]),
                                                                         self.best_metric)
        if is_best:
            self.best_metric = float(row[metric])
        if self._ckpt is None:
            return
        meta = _jsonable(self._meta(ctx, pos))
        state = self.par.get_state(self.state)
        self._ckpt.save(self.global_step, state, meta)
        if is_best:
            self._ckpt.save(self.global_step, state, meta, best=True)

    def _restore(self, meta: dict[str, Any], tx: Any, epochs: int) -> tuple[int, int]:
        if meta["phase_epochs"] != epochs:
            raise ValueError(f"the checkpoint's phase {meta['phase']} runs {meta['phase_epochs']} epoch(s) but this "
                             f"call asks for {epochs}; resume with the same recipe and config")
        if meta["n_frozen_groups"] != self.n_frozen_groups:
            raise ValueError(f"the checkpoint froze {meta['n_frozen_groups']} layer group(s), this phase freezes "
                             f"{self.n_frozen_groups}; resume with the same recipe")
        assert self._ckpt is not None
        target = self.par.get_state(self.state.replace(opt_state=self._fresh_opt_state(tx)))
        restored = self._ckpt.restore_state(target, step=int(meta["global_step"]))
        self.state = self.par.put_state(restored)
        self._reset_opt = False
        self.global_step = int(meta["global_step"])
        self.data_epoch = int(meta["data_epoch"])
        self.history = list(meta["history"])
        self.step_losses = [float(x) for x in meta["step_losses"]]
        self.best_metric = meta["best_metric"]
        self._smooth.load_state_dict(meta["smooth_loss"])
        self._resume_meta = None
        if self.is_main:
            print(f"jaxtl: resumed from step {self.global_step} (phase {meta['phase']}, epoch {meta['epoch']}, "
                  f"batch {meta['step_in_epoch']})", file=sys.stderr, flush=True)
        return int(meta["epoch"]), int(meta["step_in_epoch"])

    def load(self, best: bool = True) -> None:
        """Load params and BatchNorm statistics from the work dir's best (else latest) checkpoint."""
        if self._ckpt is None:
            raise ValueError("load needs a work dir with checkpoints")
        use_best = best and self._ckpt.latest_step(best=True) is not None
        raw = self._ckpt.restore_state(None, best=use_best)
        params = jax.tree.map(lambda t, x: np.asarray(x, t.dtype), self.variables["params"], raw["params"])
        stats = jax.tree.map(lambda t, x: np.asarray(x, t.dtype), self.variables["batch_stats"], raw["batch_stats"])
        self.state = self.state.replace(**self.par.put_state({"params": params, "batch_stats": stats}))

    # ------------------------------------------------------------------------------------------ evaluation
    def validate(self) -> dict[str, float]:
        """``valid_loss``, ``error_rate``, ``accuracy`` [, ``top_5_accuracy``] over the validation set (NaN when
        the data has none)."""
        nan = float("nan")
        if int(getattr(self.data, "num_valid", 1)) == 0:
            out = {"valid_loss": nan, "error_rate": nan, "accuracy": nan}
            if self.num_classes > 5:
                out["top_5_accuracy"] = nan
            return out
        t0 = time.perf_counter()
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        total: dict[str, float] | None = None
        for b in self.data.valid_batches():
            # Each batch's sums are fetched (float64 on the host) before the next batch is dispatched: the eval
            # programs carry an all-reduce and do not depend on each other, and two such programs in flight at
            # once can deadlock XLA:CPU's in-process collectives (parallel.py, "One collective program at a time").
            sums = self._eval(variables, self.par.put_batch(b))
            total = metrics.add_sums(total, {k: self.par.scalar(v) for k, v in sums.items()})
        if total is None:
            raise ValueError("the validation iterator yielded no batch")
        out = metrics.summarize(total)
        self.timings["validate"] += time.perf_counter() - t0
        return out

    def predict(self, images: Any) -> np.ndarray:
        """Softmax probabilities ``(N, num_classes)``.

        ``images``: a float array ``(N, S, S, 3)`` / ``(S, S, 3)`` already normalised (as the data yields them), or
        a sequence of file paths, encoded bytes or uint8 ``(h, w, 3)`` arrays (the validation transform is applied).
        """
        if isinstance(images, np.ndarray | jax.Array) and np.issubdtype(images.dtype, np.floating):
            x = np.asarray(images, np.float32)
            if x.ndim == 3:
                x = x[None]
        else:
            items = list(images) if not isinstance(images, np.ndarray) else list(images)
            x = np.stack([self.data.preprocess_eval(it) for it in items]) if items else np.zeros((0, 1, 1, 3))
        n = len(x)
        if n == 0:
            return np.zeros((0, self.num_classes), np.float32)
        bs = int(self.data.batch_size)
        out = []
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        for i in range(0, n, bs):
            chunk = x[i:i + bs]
            pad = bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            probs = self.par.local_outputs(self._predict(variables, self.par.put_batch({"x": chunk})["x"]))
            out.append(probs[: bs - pad])
        return np.concatenate(out)

    def get_valid_preds(self, gather: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(probs (N, C), labels (N,)): this process's validation images in ``data.valid_items`` order, or with
        ``gather=True`` the whole validation set on every process, in the global order (process ``p`` of ``n``
        holds global items ``p, p+n, ...``; a collective, so every process must call it). With one process both
        are the whole set."""
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        probs, labels, masks = [], [], []
        for b in self.data.valid_batches():  # padded to the same number of batches on every process
            probs.append(self.par.local_outputs(self._predict(variables, self.par.put_batch({"x": b["image"]})["x"])))
            labels.append(np.asarray(b["label"], np.int64))
            masks.append(np.asarray(b["mask"], bool))
        if not probs:
            return np.zeros((0, self.num_classes), np.float32), np.zeros((0,), np.int64)
        p, y, m = np.concatenate(probs), np.concatenate(labels), np.concatenate(masks)
        if not gather or jax.process_count() == 1:
            return p[m], y[m]
        # (processes, rows) -> rows-major interleave: global item j = row * n + process; padding only at the end
        # of each process's rows, so the kept entries come out in global order
        m_all = parallel.allgather(m).T.reshape(-1)
        p_all = parallel.allgather(p).transpose(1, 0, 2).reshape(-1, p.shape[-1])
        y_all = parallel.allgather(y).T.reshape(-1)
        return p_all[m_all], y_all[m_all]

    # ------------------------------------------------------------------------------------------ lr_find
    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100, stop_div: bool = True,
                show_plot: bool = True) -> LRFindResult:
        """fastai's ``lr_find``: exponential lr sweep (same lr for every group, momentum 0.9, a fresh optimiser
        state), stopping when the smoothed loss exceeds 4x its minimum (``schedules.lr_find_diverged``). Weights,
        BatchNorm statistics, optimiser state and RNG are restored afterwards and the data order is untouched. Returns
        fastai's ``valley`` suggestion; saves ``lr_find.png`` in the work dir."""
        self._begin(False)
        sched = schedules.lr_find_schedule(start_lr, end_lr, num_it)
        tx = self._optimizer([sched] * groups.N_GROUPS, None)
        mask = groups.trainable_mask(self.variables["params"], self.n_frozen_groups, bool(self.config.train.train_bn))
        step = self.par.train_step(make_train_step(self.model, tx, mask, axis_name=self.par.model_axis_name))
        saved = self.state
        one = self.par.get_state(saved)
        state = self.par.put_state(one.replace(opt_state=tx.init(one.params)))  # fresh copies; `saved` stays live
        max_steps = int(self.config.train.max_steps)
        n_it = max(int(num_it), 6)
        if max_steps:
            n_it = min(n_it, max_steps)
        smooth, best = metrics.SmoothLoss(), float("inf")
        lrs: list[float] = []
        losses: list[float] = []
        spe = int(self.data.steps_per_epoch)
        bar = progress.ProgressBar(n_it, self.global_batch, "lr_find", self.is_main)
        it = 0
        try:
            with self._sigint_to_stop():
                for e in range(n_it // spe + 1):
                    for batch in self.data.train_batches(self.data_epoch + e):
                        lr = float(sched(it))
                        state, out = step(state, self.par.put_batch(batch))
                        loss = self.par.scalar(out["loss"])
                        it += 1
                        smooth.update(loss)
                        lrs.append(lr)
                        losses.append(smooth.value)
                        bar.update(smooth.value, lr)
                        if smooth.value < best:  # NaN < x is False: as fastai, a NaN is never the best
                            best = smooth.value
                        diverged = schedules.lr_find_diverged(smooth.value, best)
                        if (stop_div and diverged) or it >= n_it or self._stop_agreed():
                            break
                    else:
                        continue
                    break
        finally:
            bar.close()
            del state
            self.state = saved
        if self._stop_requested:
            self.stopped_early, self.stop_reason = True, "interrupted"
        try:
            lr_sugg, idx = schedules.suggest_lr(lrs, losses, int(num_it))
        except ValueError as e:
            raise ValueError(f"lr_find ran {len(lrs)} step(s): too few for a suggestion; raise num_it or "
                             f"train.max_steps ({e})") from e
        plot = None
        if show_plot and self.workdir is not None and self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            plot = progress.plot_lr_find(self.workdir / "lr_find.png", lrs, losses, (lrs[idx], losses[idx]))
        if self.is_main:
            print(f"lr_find: valley suggestion {lr_sugg:.2e}", flush=True)
        return LRFindResult(lr_sugg, lrs, losses, plot)

    # ------------------------------------------------------------------------------------------ reporting
    def history_table(self) -> str:
        """The history as fastai's epoch table."""
        return progress.table_string(self.history, self.columns)

    def to_pandas(self) -> Any:
        """The history as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Learner.to_pandas needs pandas (pip install pandas); history_table() and "
                              "Learner.history work without it") from e
        return pd.DataFrame(self.history)

    def write_report(self, top_k: int = 9) -> dict[str, Path]:
        """Loss curves, confusion matrix, top losses (PNG) and ``model.safetensors`` for ``jaxtl.predict``, in the
        work dir. Returns the written paths."""
        from jaxtl import interpret
        from jaxtl.predict import save_for_inference

        if self.workdir is None:
            raise ValueError("write_report needs a work dir")
        out: dict[str, Path] = {}
        n_proc = jax.process_count()
        probs, labels = self.get_valid_preds(gather=True)  # every process takes part in the collectives
        interp = worst = images = None
        if len(labels):
            # one process: the real (path, label) items; several: each holds only its share, so global indices
            items = (list(self.data.valid_items)[: len(labels)] if n_proc == 1
                     else [(f"valid[{j}]", int(y)) for j, y in enumerate(labels)])
            interp = interpret.Interpretation.from_probs(probs, labels, self.classes, items)
            worst = sorted(int(i) for i in interpret.top_losses(interp.losses, top_k))
            images = self._gather_valid_images(worst)
        if not self.is_main:
            return out
        if self.history:
            out["loss_curves"] = interpret.plot_loss_curves(self.history, self.workdir / "loss_curves.png",
                                                            self.step_losses)
        if interp is not None:
            out["confusion_matrix"] = interp.plot_confusion_matrix(self.workdir / "confusion_matrix.png")
            by_item = {interp.items[i][0]: self.data.denormalize(images[i]) for i in worst}
            out["top_losses"] = interp.plot_top_losses(self.workdir / "top_losses.png",
                                                       lambda item: by_item[item], k=top_k)
        arch = getattr(self.model, "arch", self.config.model.arch)
        head = getattr(self.model, "head_kind", self.config.model.head)
        out["model"] = save_for_inference(self.workdir, jax.device_get(self.variables), arch=arch, head=head,
                                          classes=self.classes, size=int(self.data.size), mean=self.data.mean,
                                          std=self.data.std)
        return out

    def _gather_valid_images(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """Normalised validation images by global index (see ``get_valid_preds(gather=True)``); with several
        processes each contributes the ones it holds (a collective)."""
        n, me = jax.process_count(), jax.process_index()
        if n == 1 or not indices:
            return dict(self._valid_images(set(indices)))
        local = dict(self._valid_images({j // n for j in indices if j % n == me}))
        s = int(self.data.size)
        mine = np.stack([local[j // n] if j % n == me else np.zeros((s, s, 3), np.float32) for j in indices])
        every = parallel.allgather(mine.astype(np.float32))  # (processes, k, S, S, 3)
        return {j: every[j % n, k] for k, j in enumerate(indices)}

    def _valid_images(self, indices: set[int]) -> Iterator[tuple[int, np.ndarray]]:
        pos = 0
        for b in self.data.valid_batches():
            for img, keep in zip(b["image"], b["mask"], strict=True):
                if keep:
                    if pos in indices:
                        yield pos, img
                    pos += 1

    # ------------------------------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _sigint_to_stop(self) -> Iterator[None]:
        """While training, a first Ctrl-C requests a graceful stop and a second one aborts — unless the program
        (e.g. the CLI) installed its own SIGINT handler, which is then left alone."""
        installed = False
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            def handler(signum: int, frame: Any) -> None:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                print("\njaxtl: interrupt: finishing the current step and saving a checkpoint (Ctrl-C again to "
                      "abort)", file=sys.stderr, flush=True)
                self.request_stop()

            signal.signal(signal.SIGINT, handler)
            installed = True
        try:
            yield
        finally:
            if installed:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
        if self._ckpt is not None:
            self._ckpt.close()


def _jsonable(x: Any) -> Any:
    """Metadata -> plain JSON types (NaN kept as a float: Python's json writes and reads it)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


# ---------------------------------------------------------------------------------------------- recipes
def run_recipe(learn: Learner, config: ml_collections.ConfigDict | None = None,
               resume: bool = False) -> dict[str, Any]:
    """Run ``config.train.recipe`` (fine_tune | one_cycle | lr_find) on ``learn``; returns a summary dict.

    ``train.pct_start`` / ``train.div`` of -1 take the recipe's fastai default (``jaxtl.config.recipe_value``).
    """
    from jaxtl.config import recipe_value

    cfg = config if config is not None else learn.config
    t = cfg.train
    pct, div = float(recipe_value(cfg, "pct_start")), float(recipe_value(cfg, "div"))
    if t.recipe == "fine_tune":
        learn.fine_tune(int(t.epochs), base_lr=float(t.lr), freeze_epochs=int(t.freeze_epochs),
                        lr_mult=float(t.lr_mult), pct_start=pct, div=div, div_final=float(t.div_final),
                        moms=tuple(t.moms), resume=resume)
    elif t.recipe == "one_cycle":
        learn.fit_one_cycle(int(t.epochs), float(t.lr), div=div, div_final=float(t.div_final), pct_start=pct,
                            moms=tuple(t.moms), resume=resume)
    elif t.recipe == "lr_find":
        res = learn.lr_find()
        return {"recipe": "lr_find", "valley": res.valley}
    else:
        raise ValueError(f"config field train.recipe={t.recipe!r} is not valid; choose fine_tune, one_cycle or "
                         "lr_find")
    summary: dict[str, Any] = {"recipe": str(t.recipe)}
    if learn.history:
        last = learn.history[-1]
        summary.update({k: last[k] for k in learn.columns if k in last and k != "time"})
    return summary


def run(config: ml_collections.ConfigDict, workdir: str | Path | None = None, resume: bool = False) -> Learner:
    """``Learner.from_config`` + :func:`run_recipe`; returns the Learner (its ``history``, ``stopped_early``)."""
    learn = Learner.from_config(config, workdir)
    run_recipe(learn, config, resume=resume)
    return learn
