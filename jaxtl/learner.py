"""``Learner``: fastai's notebook API over the pure jaxtl engine.

::

    learn = Learner.from_config(config, workdir="runs/pets")   # data, model, pretrained body (frozen)
    learn.lr_find()                                            # -> LRFindResult(valley=...), lr_find.png
    learn.fine_tune(1)                                         # fastai's recipe: frozen epoch, then unfrozen
    learn.validate(); learn.predict(["cat.jpg"]); learn.history_table()

The Learner holds the run (model, state, data, history) and builds what each recipe needs; the work is done
elsewhere: ``jaxtl.loop`` (the one epoch/step loop, for ``fit_one_cycle``, ``fine_tune`` and ``lr_find``),
``jaxtl.train`` (the pure steps), ``jaxtl.optim`` (the optimiser), ``jaxtl.checkpoint`` (orbax, resume checks),
``jaxtl.progress`` (table, CSV, TensorBoard), ``jaxtl.report`` (plots, inference model), ``jaxtl.predict``.

Each ``fit_one_cycle`` call is one *phase*: its trainable mask, optimiser and jitted step are built once
(schedules read their position from the optimiser state, so nothing recompiles between epochs). Per epoch the
Learner prints a row of fastai's table, rewrites ``history.csv``, logs TensorBoard scalars and saves an orbax
checkpoint (and the best one by ``train.metric``). ``fit_one_cycle(..., resume=True)`` / ``fine_tune(...,
resume=True)`` continue from the latest checkpoint: phase, schedule position, data order, RNG, history and
smoothed loss, so the final parameters equal an uninterrupted run's.

Stops: ``request_stop()`` (from ``jaxtl.loop.stop_on_signals``: installed around a fit when nothing else handles
SIGINT) finishes the current step, saves a checkpoint and returns with ``stopped_early`` set and ``stop_reason ==
"interrupted"``. A NaN/inf loss stops without saving (the last good checkpoint stays) with ``stop_reason`` naming
the step and learning rate. ``train.max_steps`` ends each fit after that many steps (the partial epoch is
validated and checkpointed; not an early stop).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtl import checkpoint, ema, fit, groups, loop, metrics, parallel, probe, progress, schedules, tta
from jaxtl.device_augment import BatchTransform
from jaxtl.predict import predict_in_batches
from jaxtl.train import TrainState, compute_dtype, make_eval_step, make_predict_step

PyTree = Any
LRSpec = float | slice | Sequence[float] | None


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
        self.config, self.data = config, data
        self.workdir = Path(workdir) if workdir is not None else None
        t = config.train
        self.par = parallel.DataParallel(str(t.parallel))
        self.is_main = jax.process_index() == 0
        self.global_batch = int(data.batch_size) * jax.process_count()
        self.par.check_batch_size(self.global_batch)
        self.model = model.clone(dtype=compute_dtype(str(t.precision)), axis_name=self.par.model_axis_name)
        self.classes = list(data.classes)
        self.num_classes = len(self.classes)
        self.columns = progress.columns_for(self.num_classes, sized=bool(getattr(data, "size_schedule", ())))
        if str(t.metric) == "top_5_accuracy" and self.num_classes <= 5:
            raise ValueError(f"config field train.metric='top_5_accuracy' is computed only with more than 5 classes; "
                             f"this data has {self.num_classes}: choose error_rate, accuracy, valid_loss or train_loss")
        rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 1)
        average = ema.start(variables) if ema.Ema.from_config(t) else None  # train.ema_decay > 0
        self.eval_ema = average is not None and bool(t.eval_ema)  # validate / export the EMA weights
        self.state = self.par.put_state(TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                                   batch_stats=variables["batch_stats"], opt_state=None, rng=rng,
                                                   ema=average))
        self.n_frozen_groups = 0
        self._reset_opt = True
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.global_step = 0  # optimiser steps over the Learner's life (checkpoint ids)
        self.data_epoch = 0  # training epochs started; the data order of an epoch is a function of this
        self.phase = 0  # index of the next fit_one_cycle call (resume matches phases by it)
        self.best_metric: float | None = None
        self.stopped_early, self.stop_reason, self._stop_requested = False, None, False
        self._resume_meta: dict[str, Any] | None = None
        self._smooth = metrics.SmoothLoss()
        self._ckpt = checkpoint.Checkpointer(self.workdir) if self.workdir is not None and bool(t.checkpoint) else None
        self._logger = progress.HistoryLogger(self.workdir, enabled=self.is_main) if self.workdir else None
        # the pipeline's uint8 batches are augmented and normalised on the device, inside the steps
        self.transform = BatchTransform.for_data(data)
        self._eval = self.par.eval_step(make_eval_step(self.model, axis_name=self.par.model_axis_name,
                                                       transform=self.transform))
        self._predict = self.par.predict_step(make_predict_step(self.model, self.transform))
        self._train_step: Any = None
        self._loop = loop.Loop(self.par.put_batch, self.par.fetch, self.global_batch, self._stop_agreed,
                               show=self.is_main, sync_every=loop.sync_every(int(t.sync_every)))
        self._validate_s = 0.0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> Learner:
        """Data via ``build_data``, model via ``create_model`` (``num_classes = len(classes)``), weights from
        ``model.pretrained`` (body replaced, fresh head; the Learner starts frozen as fastai's ``vision_learner``)
        or a random initialisation. The config is validated here, once."""
        from jaxtl.config import validate
        from jaxtl.data import build_data
        from jaxtl.models import create_model
        from jaxtl.run_setup import log, start_run

        validate(config)
        start_run(config, workdir)  # as jaxtl.main: compilation cache, train.log, config.json
        t, m = config.train, config.model
        parallel.DataParallel(str(t.parallel)).check_batch_size(int(t.batch_size))
        n_proc = jax.process_count()
        data = build_data(config.data, int(t.batch_size) // n_proc, int(config.seed), jax.process_index(), n_proc)
        log.info("data: %s", data.description)
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

    def trainable_mask(self) -> PyTree:
        """The one freezing object of a phase: bools shaped like the parameters, True where ``freeze_to`` and
        ``train.train_bn`` let a leaf train. The optimiser's labels and the train step both read it."""
        return groups.trainable_mask(self.variables["params"], self.n_frozen_groups, bool(self.config.train.train_bn))

    @property
    def variables(self) -> dict[str, PyTree]:
        """Current ``{"params", "batch_stats"}`` (one replica, device arrays)."""
        st = self.par.get_state(self.state)
        return {"params": st.params, "batch_stats": st.batch_stats}

    @property
    def eval_variables(self) -> dict[str, PyTree]:
        """The weights validation, prediction and export use: the EMA with ``train.eval_ema``, else
        :attr:`variables` (one replica)."""
        return self.par.get_state(self._placed_eval_variables())

    def _placed_eval_variables(self) -> dict[str, PyTree]:  # as the steps take them (placed by self.par)
        return dict(self.state.ema) if self.eval_ema else {k: getattr(self.state, k) for k in ("params", "batch_stats")}

    def request_stop(self) -> None:
        """Ask the running fit to stop after the current step (checkpoint saved). Safe from a signal handler."""
        self._stop_requested = True

    def _stop_agreed(self, in_flight: Any = None) -> bool:
        """Whether to stop after this step. With several processes a signal may reach only some of them (or at
        different steps), so after every ``train.sync_every``-th step (``in_flight`` = that step) the request is
        OR-ed over processes and all stop together; after the other steps the answer is no. It waits for the step
        ``in_flight`` first, so that the agreement never runs beside another collective program (parallel.py, "One
        collective program at a time"). One process: the request, at once."""
        if jax.process_count() > 1:
            if in_flight is None:
                return False
            jax.block_until_ready(in_flight)
            self._stop_requested = parallel.any_process(self._stop_requested)
        return self._stop_requested

    @property
    def timings(self) -> dict[str, float]:
        """Wall seconds by activity over the Learner's life (``scripts/bench_e2e.py``)."""
        return {**self._loop.timings, "validate": self._validate_s}

    @property
    def first_step_done_at(self) -> float | None:
        """``time.time()`` when the first training step finished (start-up figure of ``jaxtl.main``)."""
        return self._loop.first_step_done_at

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

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100, stop_div: bool = True,
                show_plot: bool = True) -> LRFindResult:
        """fastai's ``lr_find``: the loop with an exponential lr schedule (same lr for every group, momentum 0.9,
        a fresh optimiser state) and a stop rule, ``schedules.lr_find_diverged`` (smoothed loss above 4x its
        minimum). Weights, BatchNorm statistics, optimiser state and RNG are left as they were and the data order
        is untouched. Returns fastai's ``valley`` suggestion; saves ``lr_find.png`` in the work dir."""
        self._begin(False)
        lrs, losses, reason = fit.lr_find(self, start_lr, end_lr, num_it, stop_div)
        if reason == "interrupted":
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
        checkpoint.check_resumable(meta, self.classes, self.workdir)
        self._resume_meta = meta
        return meta

    def _fit_phase(self, epochs: int, lrs: Sequence[float], div: float, div_final: float, pct_start: float,
                   moms: tuple[float, ...]) -> list[dict[str, Any]]:
        return fit.fit_phase(self, epochs, lrs, div, div_final, pct_start, moms)

    def load(self, best: bool = True) -> None:
        """Load params, BatchNorm statistics (and the EMA) from the work dir's best (else latest) checkpoint."""
        fit.load_weights(self, best)

    # ------------------------------------------------------------------------------------------ evaluation
    def validate(self) -> dict[str, float]:
        """``valid_loss``, ``error_rate``, ``accuracy`` [, ``top_5_accuracy``] over the validation set (NaN when
        the data has none)."""
        if int(getattr(self.data, "num_valid", 1)) == 0:
            names = ["valid_loss", "error_rate", "accuracy"] + (["top_5_accuracy"] if self.num_classes > 5 else [])
            return dict.fromkeys(names, float("nan"))
        t0 = time.perf_counter()
        variables = self._placed_eval_variables()
        total: dict[str, float] | None = None
        for b in self.data.valid_batches(self.data_epoch):  # at the size of the epoch (data.size_schedule)
            # Each batch's sums are fetched (float64 on the host) before the next batch is dispatched: the eval
            # programs carry an all-reduce and do not depend on each other, and two such programs in flight at
            # once can deadlock XLA:CPU's in-process collectives (parallel.py, "One collective program at a time").
            sums = self._eval(variables, self.par.put_batch(b))
            total = metrics.add_sums(total, {k: self.par.scalar(v) for k, v in sums.items()})
        if total is None:
            raise ValueError("the validation iterator yielded no batch")
        self._validate_s += time.perf_counter() - t0
        return metrics.summarize(total)

    def _probs(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities of one batch of ``data.batch_size`` normalised images (this process's rows)."""
        variables = self._placed_eval_variables()
        return self.par.local_outputs(self._predict(variables, self.par.put_batch({"x": images})["x"]))

    def predict(self, images: Any) -> np.ndarray:
        """Softmax probabilities ``(N, num_classes)``.

        ``images``: a float array ``(N, S, S, 3)`` / ``(S, S, 3)`` already normalised (as the data yields them), or
        a sequence of file paths, encoded bytes or uint8 ``(h, w, 3)`` arrays (the validation transform is applied).
        """
        if isinstance(images, np.ndarray | jax.Array) and np.issubdtype(images.dtype, np.floating):
            x = np.asarray(images, np.float32)
            x = x[None] if x.ndim == 3 else x
        else:
            items = list(images)
            x = np.stack([self.data.preprocess_eval(it) for it in items]) if items else np.zeros((0, 1, 1, 3))
        return predict_in_batches(self._probs, x, int(self.data.batch_size)).reshape(len(x), self.num_classes)

    def tta(self, n: int = 4, beta: float | None = 0.25) -> tuple[Any, np.ndarray]:
        """fastai's ``Learner.tta`` on this process's validation images (``jaxtl.tta``; ``beta=None``: both)."""
        return tta.tta(self, n, beta)

    def get_valid_preds(self, gather: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(probs (N, C), labels (N,)): this process's validation images in ``data.valid_items`` order, or with
        ``gather=True`` the whole validation set on every process, in the global order (process ``p`` of ``n``
        holds global items ``p, p+n, ...``; a collective, so every process must call it). With one process both
        are the whole set."""
        probs, labels, masks = [], [], []
        for b in self.data.valid_batches():  # padded to the same number of batches on every process
            probs.append(self._probs(b["image"]))
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

    # ------------------------------------------------------------------------------------------ reporting
    def history_table(self) -> str:
        """The history as fastai's epoch table."""
        return progress.table_string(self.history, self.columns)

    def to_pandas(self) -> Any:
        """The history as a pandas DataFrame (needs pandas)."""
        return progress.to_pandas(self.history)

    def write_report(self, top_k: int = 9) -> dict[str, Path]:
        """Loss curves, confusion matrix, top losses (PNG) and ``model.safetensors`` for ``jaxtl.predict``, in the
        work dir (``jaxtl.report``). Returns the written paths."""
        from jaxtl.report import write_report

        return write_report(self, top_k)

    def close(self) -> None:
        for part in (self._logger, self._ckpt):
            if part is not None:
                part.close()


# ---------------------------------------------------------------------------------------------- recipes
def run_recipe(learn: Learner, config: ml_collections.ConfigDict | None = None,
               resume: bool = False) -> dict[str, Any]:
    """Run ``config.train.recipe`` (``schedules.RECIPES``) on ``learn``; returns a summary dict.

    ``train.pct_start`` / ``train.div`` of -1 take the recipe's fastai default (``jaxtl.config.recipe_value``).
    """
    from jaxtl.config import recipe_value

    cfg = config if config is not None else learn.config
    t = cfg.train
    pct, div = float(recipe_value(cfg, "pct_start")), float(recipe_value(cfg, "div"))
    if t.recipe == "lr_find":
        return {"recipe": "lr_find", "valley": learn.lr_find().valley}
    if t.recipe == "fine_tune":
        learn.fine_tune(int(t.epochs), base_lr=float(t.lr), freeze_epochs=int(t.freeze_epochs),
                        lr_mult=float(t.lr_mult), pct_start=pct, div=div, div_final=float(t.div_final),
                        moms=tuple(t.moms), resume=resume)
    elif t.recipe == "linear_probe":  # the head on the frozen body's features (jaxtl.probe)
        probe.fit(learn, resume)
    else:  # one_cycle (config.validate checked the choice)
        learn.fit_one_cycle(int(t.epochs), float(t.lr), div=div, div_final=float(t.div_final), pct_start=pct,
                            moms=tuple(t.moms), resume=resume)
    summary: dict[str, Any] = {"recipe": str(t.recipe), **tta.after_fit(learn, int(t.tta))}  # train.tta
    if learn.history:
        last = learn.history[-1]
        summary.update({k: last[k] for k in learn.columns if k in last and k != "time"})
    return summary


def run(config: ml_collections.ConfigDict, workdir: str | Path | None = None, resume: bool = False) -> Learner:
    """``Learner.from_config`` + :func:`run_recipe`; returns the Learner (its ``history``, ``stopped_early``)."""
    learn = Learner.from_config(config, workdir)
    run_recipe(learn, config, resume=resume)
    return learn
