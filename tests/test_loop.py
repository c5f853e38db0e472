"""The one loop (``jaxtl.loop``): its contract on a toy step, that fit_one_cycle / fine_tune / lr_find all run
through it, and that the phase's trainable mask is the one source of freezing (a step changes exactly the leaves
it marks trainable, for every ``freeze_to`` and ``train_bn``, in both optimiser-state layouts)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import TinyBundle  # noqa: E402

from jaxtl import groups, loop, metrics  # noqa: E402
from jaxtl.config import base_config  # noqa: E402
from jaxtl.learner import Learner  # noqa: E402
from jaxtl.models import create_model  # noqa: E402


# ------------------------------------------------------------------------------------------ toy contract
def toy_step(state, batch):
    """state = running sum; loss = the batch's value (so the loss sequence is the data)."""
    return state + batch["x"], {"loss": batch["x"]}


def toy_loop(stop_at=None, sync_every=1):
    asked = []  # what stop_requested got: the step in flight at a sync point, None between them

    def stop_requested(x):
        asked.append(None if x is None else float(x))
        return stop_at is not None and len(asked) >= stop_at

    def fetch(xs):
        return [float(x) for x in xs]

    return loop.Loop(lambda b: {"x": jnp.float32(b)}, fetch, 1, stop_requested, show=False,
                     sync_every=sync_every), asked


def batches(e, s):
    return [10 * e + i for i in range(s, 3)]  # 3 batches per epoch, values 0,1,2 / 10,11,12 / ...


def run(lp, plan, on_loss=None, on_epoch_end=None):
    seen, ends = [], []

    def loss_hook(run_step, loss, lr):
        seen.append((run_step, loss, lr))
        return on_loss(run_step, loss) if on_loss else None

    def end_hook(state, end):
        ends.append((float(state), end.epoch, end.done, end.reason))
        return on_epoch_end(end) if on_epoch_end else end.reason  # as the Learner: go on unless it ended early

    state, reason = lp.run(toy_step, jnp.float32(0), batches, plan, metrics.SmoothLoss(), loss_hook, end_hook)
    return float(state), reason, seen, ends


def plan(epochs=2, start=(0, 0), max_steps=0):
    return loop.Plan(epochs, 3, np.arange(epochs * 3, dtype=np.float64) / 100, start, max_steps)


def test_every_step_once_in_order_with_its_lr_and_epoch_ends():
    lp, asked = toy_loop()
    state, reason, seen, ends = run(lp, plan())
    assert reason is None and state == 0 + 1 + 2 + 10 + 11 + 12
    assert [s[:2] for s in seen] == [(0, 0), (1, 1), (2, 2), (3, 10), (4, 11), (5, 12)]
    assert [s[2] for s in seen] == pytest.approx([0, 0.01, 0.02, 0.03, 0.04, 0.05])
    assert ends == [(3.0, 0, 3, None), (36.0, 1, 3, None)]  # the state after each epoch's last step
    # sync_every=1: the stop agreement after every step; after each step but an epoch's first, the previous loss
    # is read while this one runs
    assert asked == [0, 1, 2, 10, 11, 12] and lp.first_step_done_at is not None
    assert lp.fetches == 6


def test_resume_position_and_max_steps_mid_epoch():
    lp, _ = toy_loop()
    state, reason, seen, ends = run(lp, plan(start=(0, 2), max_steps=2))
    assert reason == "max_steps" and [s[0] for s in seen] == [2, 3]  # batch 2 of epoch 0, then batch 0 of epoch 1
    assert ends == [(2.0, 0, 3, None), (12.0, 1, 1, "max_steps")]


def test_a_stop_from_on_loss_ends_at_once_without_epoch_end():
    lp, _ = toy_loop()
    state, reason, seen, ends = run(lp, plan(), on_loss=lambda step, loss: "diverged" if loss == 1 else None)
    assert reason == "diverged" and ends == []
    assert [s[0] for s in seen] == [0, 1]  # step 2 was dispatched (one step late) but its loss is not reported


def test_interrupt_and_epoch_end_decisions():
    lp, _ = toy_loop(stop_at=2)
    state, reason, seen, ends = run(lp, plan())
    assert reason == "interrupted" and [s[0] for s in seen] == [0, 1] and ends == [(1.0, 0, 2, "interrupted")]
    lp, _ = toy_loop()
    state, reason, seen, ends = run(lp, plan(), on_epoch_end=lambda end: "diverged")
    assert reason == "diverged" and len(ends) == 1 and len(seen) == 3


class Tripwire:
    """A device loss stand-in that fails when anything but the loop's fetch reads it (``float``, ``np.asarray``,
    ``bool``, ``int``, ``jax.device_get``): the CPU check that the steady state has no host read outside the
    fetch point (on the CPU ``jax.transfer_guard_device_to_host`` does not fire; off it the guard test below does)."""

    def __init__(self, v):
        self.v = v

    def _read(self, *a, **k):
        raise AssertionError("a step's loss was read outside the loop's fetch point")

    __float__ = __int__ = __bool__ = __index__ = __array__ = __jax_array__ = _read

    def block_until_ready(self):
        return self


@pytest.mark.parametrize("sync_every,spe", [(1, 3), (3, 7), (4, 8), (10, 4)])
def test_losses_are_read_only_at_the_fetch_point_every_sync_every_steps(sync_every, spe):
    fetched = []

    def fetch(xs):
        assert all(isinstance(x, Tripwire) for x in xs)
        fetched.append([x.v for x in xs])
        return [float(x.v) for x in xs]

    asked = []
    lp = loop.Loop(lambda b: b, fetch, 1, lambda x: asked.append(x) or False, show=False, sync_every=sync_every)
    seen = []
    state, reason = lp.run(lambda st, b: (st + b, {"loss": Tripwire(b)}), 0, lambda e, s: range(10 * e, 10 * e + spe),
                           loop.Plan(2, spe, np.zeros(2 * spe)), metrics.SmoothLoss(),
                           lambda step, loss, lr: seen.append((step, loss)) or None)
    assert reason is None and lp.fetches == len(fetched) == 2 * -(-spe // sync_every)
    per_epoch = [list(range(10 * e, 10 * e + spe)) for e in range(2)]
    assert [v for f in fetched for v in f] == [v for e in per_epoch for v in e]  # each loss once, in order
    assert all(len(f) == sync_every for f in fetched if f[-1] % 10 != spe - 1)  # full runs but an epoch's last
    assert seen == [(e * spe + i, float(v)) for e in range(2) for i, v in enumerate(per_epoch[e])]
    # the stop agreement is offered the step just dispatched after every sync_every-th step of the run only
    run_values = [v for e in per_epoch for v in e]
    assert len(asked) == 2 * spe
    expect = [v if (r + 1) % sync_every == 0 else None for r, v in enumerate(run_values)]
    assert [None if x is None else x.v for x in asked] == expect


def test_a_stop_from_on_loss_is_seen_at_the_next_sync_point():
    lp, _ = toy_loop(sync_every=3)
    state, reason, seen, ends = run(lp, plan(epochs=1), on_loss=lambda step, loss: "diverged" if loss == 1 else None)
    assert reason == "diverged" and ends == [] and [s[0] for s in seen] == [0, 1]  # reported steps stop at 1
    assert state == 0 + 1 + 2  # every batch of the epoch was dispatched before the read at its end


# ------------------------------------------------------------------------------------------ the Learner
def config(**train):
    cfg = base_config()
    cfg.model.arch, cfg.train.batch_size = "resnet18", 4
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def init_vars():
    model = create_model("resnet18", 3)
    return model, jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))


def test_fit_one_cycle_fine_tune_and_lr_find_all_run_through_the_one_loop(init_vars, monkeypatch):
    calls = []
    original = loop.Loop.run

    def spy(self, step, state, batches, plan, *args, **kwargs):
        calls.append((plan.epochs, plan.max_steps))
        return original(self, step, state, batches, plan, *args, **kwargs)

    monkeypatch.setattr(loop.Loop, "run", spy)
    model, v = init_vars
    learn = Learner(model, v, TinyBundle(n_train=8), config(max_steps=1))
    learn.fit_one_cycle(1, 1e-3)
    learn.fine_tune(1, freeze_epochs=1)
    learn.config.train.max_steps = 0
    learn.lr_find(num_it=6, stop_div=False, show_plot=False)  # 6 steps: 3 epochs of 2 batches
    assert calls == [(1, 1), (1, 1), (1, 1), (3, 6)]  # one_cycle; fine_tune's two phases; lr_find
    assert learn.global_step == 3  # lr_find's steps are not the run's


@pytest.mark.parametrize("reset_opt", [True, False])
def test_a_step_changes_exactly_the_leaves_the_mask_marks_trainable(init_vars, reset_opt):
    model, v = init_vars
    for train_bn in (True, False):
        for n in (0, 1, 2):
            learn = Learner(model, v, TinyBundle(n_train=4), config(max_steps=1, train_bn=train_bn,
                                                                    reset_opt_on_freeze=reset_opt))
            learn.freeze_to(n)
            mask = learn.trainable_mask()
            assert mask == groups.trainable_mask(v["params"], n, train_bn)
            before = jax.tree.map(np.array, learn.variables["params"])
            learn.fit_one_cycle(1, 1e-2)
            after = jax.tree.map(np.array, learn.variables["params"])
            changed = jax.tree.map(lambda a, b: a.tobytes() != b.tobytes(), after, before)
            assert changed == mask, (n, train_bn, reset_opt)


def test_sync_every_changes_only_when_losses_are_read_and_the_steady_state_reads_nothing_else(init_vars):
    """fit_one_cycle with losses read every 4 steps equals the per-step run (same parameters, losses, history);
    the loop fetches once per 4 steps (plus an epoch's rest) and runs its steady state under
    ``transfer_guard_device_to_host("disallow")`` (fires on a GPU/TPU on any other read: gpu_check runs this)."""
    model, v = init_vars
    runs = {}
    for n in (1, 4):
        learn = Learner(model, v, TinyBundle(n_train=36), config(sync_every=n))  # 9 steps per epoch
        assert learn._loop.sync_every == n
        learn._loop.transfer_guard = "disallow"
        learn.fit_one_cycle(2, 1e-3)
        runs[n] = learn
        assert learn._loop.fetches == 2 * -(-9 // n) and len(learn.step_losses) == 18 and learn.global_step == 18
    a, b = runs[1], runs[4]
    assert a.step_losses == b.step_losses
    assert [r["valid_loss"] for r in a.history] == [r["valid_loss"] for r in b.history]
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_sync_every_auto_is_per_backend():
    from jaxtl.loop import sync_every

    assert sync_every(0, "cpu") == 1 and sync_every(0, "gpu") == sync_every(0, "tpu") == 16
    assert sync_every(5, "cpu") == sync_every(5, "gpu") == 5
