"""The one training loop: epochs of a jitted step over the data, each step's loss read one step late, the stops.

``fit_one_cycle``, ``fine_tune`` (a list of one-cycle phases) and ``lr_find`` all run through :meth:`Loop.run`.
What differs between them is handed in: the step (its optimiser holds the schedule), ``on_loss`` (what a finished
step's loss does: fastai's smoothed loss, logs, a stop rule) and ``on_epoch_end`` (validation, the table row,
checkpoints; nothing for lr_find). This is fastai's ``fit`` with its two callback events that jaxtl uses, written as
two functions rather than a callback system.

A run ends for one of these reasons (``Loop.run`` returns it): ``None`` (every epoch done), ``"interrupted"``
(``stop_requested()`` said so after a step), ``"max_steps"`` (the step budget ran out), or the reason a hook
returned (e.g. ``"diverged"``). A hook's stop from ``on_loss`` ends the run at once, without ``on_epoch_end``.

Host reads (``train.sync_every`` = N): losses stay on the device and are fetched N at a time, in one call of
``fetch`` (the loop's one device-to-host point), after the step that follows them was dispatched, so the device
queue never drains; at an epoch's end the rest are fetched before ``on_epoch_end`` runs. ``stop_requested`` gets
the step just dispatched after every N-th step of a run and None otherwise (the multi-process stop agreement is a
collective that waits for that step: once per N steps, not per step). Everything else in the steady state runs
under ``jax.transfer_guard_device_to_host(Loop.transfer_guard)`` (``"allow"``; the tests set ``"disallow"``, which
raises off the CPU on any other read).
N = 1 is fastai's per-step bar (each loss one step late); a stop from ``on_loss`` (a NaN, lr_find's divergence)
is seen at the next sync point, with the step it names.

:func:`stop_on_signals` is jaxtl's one SIGINT / SIGTERM handler, used by ``jaxtl.main`` for the whole recipe and
by the Learner around each fit when nothing else handles SIGINT.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jaxtl import metrics, progress

PyTree = Any
OnLoss = Callable[[int, float, float], str | None]  # (step of the run, loss, head lr) -> stop reason or None
Fetch = Callable[[list[Any]], list[float]]  # device scalars (losses) -> host floats, in one transfer


SYNC_EVERY_AUTO = {"cpu": 1}  # train.sync_every=0 by backend; elsewhere (GPU/TPU) SYNC_EVERY_ACCELERATOR
SYNC_EVERY_ACCELERATOR = 16


def sync_every(value: int, backend: str | None = None) -> int:
    """``train.sync_every`` -> steps between the loop's host reads: ``0`` (auto) is 1 on the CPU (fastai's bar,
    each loss one step late; the step takes seconds there) and 16 on a GPU/TPU (one read per 16 steps)."""
    if value:
        return value
    backend = jax.default_backend() if backend is None else backend
    return SYNC_EVERY_AUTO.get(backend, SYNC_EVERY_ACCELERATOR)


@dataclass(frozen=True)
class EpochEnd:
    """How an epoch ended: its index in the run, the batches done in it (``steps_per_epoch`` when finished),
    ``reason`` it ended early (``"interrupted"`` / ``"max_steps"``, None when finished) and its wall seconds."""

    epoch: int
    done: int
    reason: str | None
    seconds: float


OnEpochEnd = Callable[[PyTree, EpochEnd], str | None]  # (state after the epoch, how it ended) -> stop reason


@dataclass(frozen=True)
class Plan:
    """What one run of the loop covers. ``lrs``: the head group's lr at each step of the run (progress bar,
    logs, messages); ``start``: (epoch, batch) to begin at (a resumed run); ``max_steps``: 0 = no limit."""

    epochs: int
    steps_per_epoch: int
    lrs: np.ndarray
    start: tuple[int, int] = (0, 0)
    max_steps: int = 0


class Loop:
    """Runs plans. ``put_batch`` / ``fetch`` come from ``jaxtl.parallel.DataParallel``; ``stop_requested(x)`` is
    asked after every step, with ``x`` the step just dispatched after every ``sync_every``-th step of a run (a
    multi-process agreement may run then) and None after the others. ``timings`` sums wall seconds by activity over
    the loop's life (``scripts/bench_e2e.py``): waiting for the input pipeline, the first step of each run (trace
    + compile or cache load), later steps. ``fetches`` counts calls of ``fetch``."""

    def __init__(self, put_batch: Callable[[Any], Any], fetch: Fetch, global_batch: int,
                 stop_requested: Callable[[Any], bool], show: bool = True, sync_every: int = 1) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.put_batch, self.fetch = put_batch, fetch
        self.global_batch, self.show, self.sync_every = global_batch, show, sync_every
        self.stop_requested = stop_requested
        self.transfer_guard = "allow"  # jax.transfer_guard_device_to_host level of the steady state
        self.fetches = 0
        self.timings = {"data_wait": 0.0, "first_step": 0.0, "step": 0.0}
        self.first_step_done_at: float | None = None  # time.time() when the first step finished

    def run(self, step: Callable[[PyTree, Any], tuple[PyTree, dict[str, Any]]], state: PyTree,
            batches: Callable[[int, int], Iterable[Any]], plan: Plan, smooth: metrics.SmoothLoss, on_loss: OnLoss,
            on_epoch_end: OnEpochEnd | None = None, label: Callable[[int], str] = str) \
            -> tuple[PyTree, str | None]:
        """Run ``plan``; ``batches(epoch, start_batch)`` yields an epoch's batches; ``label(epoch)`` names its
        progress bar. Every loss goes into ``smooth`` (fastai's smoothed loss, shown on the bar) before
        ``on_loss`` sees it. Returns the final state and why the run ended."""
        spe, steps_run = plan.steps_per_epoch, 0
        start_epoch, start_step = plan.start
        for epoch in range(start_epoch, plan.epochs):
            bar = progress.ProgressBar(spe, self.global_batch, label(epoch), self.show, start_step)
            hooks, t0 = (smooth, on_loss, bar), time.time()
            state, done, reason, steps_run = self._epoch(step, state, batches(epoch, start_step), plan, hooks,
                                                        epoch * spe, start_step, steps_run)
            if reason not in (None, "interrupted", "max_steps"):
                return state, reason  # a stop from on_loss: no epoch end
            if on_epoch_end is not None:
                reason = on_epoch_end(state, EpochEnd(epoch, done, reason, time.time() - t0))
            if reason is None and plan.max_steps and steps_run >= plan.max_steps:
                reason = "max_steps"
            if reason is not None:
                return state, reason
            start_step = 0
        return state, None

    def _epoch(self, step: Callable[..., Any], state: PyTree, batches: Iterable[Any], plan: Plan, hooks: tuple,
               first: int, done: int, steps_run: int) \
            -> tuple[PyTree, int, str | None, int]:
        """One epoch from batch ``done``; ``first`` = the run step of its batch 0. Returns (state, batches done,
        reason it ended early or None, steps run)."""
        reason, pending = None, []  # pending: (device loss, run step) not yet read
        t_wait = time.perf_counter()
        it = iter(batches)  # builds the input pipeline
        self.timings["data_wait"] += time.perf_counter() - t_wait
        try:
            with jax.transfer_guard_device_to_host(self.transfer_guard):
                while True:
                    t_wait = time.perf_counter()
                    batch = next(it, None)
                    t_step = time.perf_counter()
                    self.timings["data_wait"] += t_step - t_wait
                    if batch is None:
                        break
                    state, out = step(state, self.put_batch(batch))
                    if steps_run == 0:  # the run's first call traces + compiles (or loads from the cache)
                        jax.block_until_ready(out["loss"])
                        self.timings["first_step"] += time.perf_counter() - t_step
                        self.first_step_done_at = self.first_step_done_at or time.time()
                        t_step = time.perf_counter()
                    steps_run += 1
                    sync = len(pending) >= self.sync_every  # read them while this step runs
                    if sync:
                        reason = self._flush(pending, plan, *hooks)
                    pending.append((out["loss"], first + done))
                    done += 1
                    self.timings["step"] += time.perf_counter() - t_step
                    if reason is not None:
                        return state, done, reason, steps_run
                    if self._stop(out["loss"] if steps_run % self.sync_every == 0 else None):
                        reason = "interrupted"
                        break
                    if plan.max_steps and steps_run >= plan.max_steps and done < plan.steps_per_epoch:
                        reason = "max_steps"
                        break
            if pending:
                t_host = time.perf_counter()
                reason = self._flush(pending, plan, *hooks) or reason
                self.timings["step"] += time.perf_counter() - t_host
        finally:
            hooks[2].close()
        return state, done, reason, steps_run

    def _stop(self, in_flight: Any) -> bool:
        if in_flight is None:
            return self.stop_requested(None)
        with jax.transfer_guard_device_to_host("allow"):  # a sync point: the stop agreement may read
            return self.stop_requested(in_flight)

    def _flush(self, pending: list[tuple[Any, int]], plan: Plan, smooth: metrics.SmoothLoss, on_loss: OnLoss,
               bar: progress.ProgressBar) -> str | None:
        """The loop's one device-to-host point: read the pending losses in one ``fetch`` (waits for their steps),
        then the host side of each step in order -- its loss into the smoother, to ``on_loss``, on the bar --
        until ``on_loss`` returns a stop reason. Empties ``pending``."""
        with jax.transfer_guard_device_to_host("allow"):
            losses = self.fetch([x for x, _ in pending])
        self.fetches += 1
        steps = [s for _, s in pending]
        pending.clear()
        for loss, run_step in zip(losses, steps, strict=True):
            lr = float(plan.lrs[min(run_step, len(plan.lrs) - 1)])
            smooth.update(loss)
            reason = on_loss(run_step, loss, lr)
            bar.update(smooth.value, lr)
            if reason is not None:
                return reason
        return None


# ---------------------------------------------------------------------------------------------- signals
@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[], None], received: list[int] | None = None,
                    only_if_unhandled: bool = False) -> Iterator[None]:
    """jaxtl's one SIGINT / SIGTERM handler, for the duration of the block.

    The first SIGINT or SIGTERM (e.g. a preempted cloud machine) calls ``request_stop`` (the loop finishes the
    current step, the Learner checkpoints) and prints what happens; a second SIGINT raises ``KeyboardInterrupt``.
    The signals received are appended to ``received``. ``only_if_unhandled``: install nothing when SIGINT already
    has a handler other than Python's default (the program's own, e.g. ``jaxtl.main``'s around the recipe) or when
    not on the main thread (Python allows signal handlers only there).
    """
    got = [] if received is None else received
    if threading.current_thread() is not threading.main_thread() or (
            only_if_unhandled and signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)
        print(f"\njaxtl: {signal.Signals(signum).name}: finishing the current step and saving a checkpoint "
              "(Ctrl-C again to abort)", file=sys.stderr, flush=True)
        request_stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
