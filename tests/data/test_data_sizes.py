"""Progressive resizing (``data.size_schedule``, ``jaxtl.data.sizes``): the schedule's rules, the pipeline's batches
per epoch against fixed-size pipelines, and a Learner run (one compile per size, the size in the table, exact
resume across a size change)."""

from __future__ import annotations

import csv

import jax
import numpy as np
import pytest

from jaxtl.config import base_config, validate
from jaxtl.data import build_data
from jaxtl.data.sizes import check_size_schedule, next_change, size_at

SCHED = ((0, 24), (2, 32))


def test_size_at_and_next_change():
    assert [size_at(SCHED, e, 32) for e in range(5)] == [24, 24, 32, 32, 32]
    assert [size_at((), e, 40) for e in range(3)] == [40, 40, 40]
    assert [next_change(SCHED, e) for e in range(4)] == [2, 2, None, None]
    assert next_change((), 0) is None
    assert size_at(((0, 16), (1, 24), (3, 16)), 3, 16) == 16  # a schedule may shrink again


@pytest.mark.parametrize("schedule,size,match", [
    (((1, 24), (2, 32)), 32, "must start at epoch 0"),
    (((0, 24), (2, 28), (2, 32)), 32, "increasing epochs"),
    (((0, 24), (3, 32), (1, 40)), 40, "increasing epochs"),
    (((0, 24), (2, 32)), 224, r"ends at size 32 but data.size=224.*--config.data.size=32"),
    (((0, 24, 1),), 24, r"not an \(epoch, size\) pair"),
    (((0, 1),), 1, ">= 2 pixels"),
    ((0, 24), 24, r"not an \(epoch, size\) pair"),  # a flat pair rather than a sequence of pairs
])
def test_bad_schedules_name_the_field(schedule, size, match):
    with pytest.raises(ValueError, match=match) as e:
        check_size_schedule(schedule, size)
    assert "data.size_schedule" in str(e.value)
    c = base_config()
    c.data.source, c.data.size, c.data.size_schedule = "demo", size, schedule
    with pytest.raises(ValueError, match="data.size_schedule"):
        validate(c)


def test_each_epoch_equals_a_fixed_size_pipeline_at_its_size(tmp_path, make_class_folder, data_config):
    """Epoch e of a scheduled run yields the batches a fixed ``data.size = size_at(e)`` run yields for epoch e (the
    same crop boxes and batch-transform draws, at that size); validation follows the epoch's size."""
    make_class_folder(tmp_path / "f", {"a": 9, "b": 9}, size=(48, 40))
    cfg = data_config(path=str(tmp_path / "f"), valid_pct=0.25, size=32, size_schedule=SCHED)
    sched = build_data(cfg, 4, 3)
    fixed = {s: build_data(data_config(path=str(tmp_path / "f"), valid_pct=0.25, size=s), 4, 3) for s in (24, 32)}
    assert sched.size == 32 and [sched.size_at(e) for e in range(4)] == [24, 24, 32, 32] and sched.size_at(None) == 32
    epochs = [list(sched.train_batches(e)) for e in range(4)]  # as the loop asks: epoch after epoch
    assert sched.pipelines_built == 2  # one per size, not one per epoch
    for e, got in enumerate(epochs):
        want = list(fixed[size_at(SCHED, e, 32)].train_batches(e))
        assert len(got) == len(want) == sched.steps_per_epoch
        for g, w in zip(got, want, strict=True):
            assert g["image"].shape[1:3] == (size_at(SCHED, e, 32),) * 2
            for k in w:
                np.testing.assert_array_equal(g[k], w[k], err_msg=f"epoch {e} {k}")
    resumed = build_data(cfg, 4, 3)  # a resume in the middle of the last 24-px epoch goes on into 32 px
    again = list(resumed.train_batches(1, start_step=1)) + list(resumed.train_batches(2))
    for g, w in zip(again, epochs[1][1:] + epochs[2], strict=True):
        np.testing.assert_array_equal(g["image"], w["image"])
    for epoch, s in ((0, 24), (1, 24), (2, 32), (None, 32)):
        got = list(sched.valid_batches(epoch))
        want = list(fixed[s].valid_batches())
        assert [b["image"].shape[1] for b in got] == [s] * len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g["image"], w["image"])
    assert "size schedule ((0, 24), (2, 32))" in repr(sched)


@pytest.mark.slow
def test_learner_compiles_once_per_size_shows_it_and_resumes_exactly(tmp_path, make_class_folder):
    """A one_cycle run over 3 epochs with ((0, 24), (2, 32)): the train step compiles for 2 shapes only, the table and
    history.csv carry the size, and a run stopped by ``train.max_steps`` in epoch 1 and resumed across the size
    change ends bit-equal to the uninterrupted one."""
    from jaxtl.learner import Learner, run_recipe

    make_class_folder(tmp_path / "f", {"a": 10, "b": 10}, size=(48, 40))

    def cfg(**train):
        c = base_config()
        c.data.path, c.data.valid_pct, c.data.size, c.data.size_schedule = str(tmp_path / "f"), 0.2, 32, SCHED
        c.train.compile_cache_dir = str(tmp_path / "xla")
        c.model.arch = "resnet18"
        c.train.recipe, c.train.epochs, c.train.batch_size, c.train.lr = "one_cycle", 3, 4, 1e-3
        for k, v in train.items():
            setattr(c.train, k, v)
        validate(c)
        return c

    ref = Learner.from_config(cfg(), tmp_path / "ref")
    run_recipe(ref)
    assert ref._train_step._cache_size() == 2  # 24 px and 32 px; epoch 1 reuses epoch 0's program
    assert [r["size"] for r in ref.history] == [24, 24, 32]
    with open(tmp_path / "ref" / "history.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["epoch", "size", "train_loss"] and [r[1] for r in rows[1:]] == ["24", "24", "32"]
    assert ref.history_table().split()[:3] == ["epoch", "size", "train_loss"]

    spe = ref.data.steps_per_epoch
    a = Learner.from_config(cfg(max_steps=spe + 1), tmp_path / "run")  # stops inside epoch 1 (24 px)
    run_recipe(a)
    assert a.global_step == spe + 1
    b = Learner.from_config(cfg(), tmp_path / "run")
    run_recipe(b, resume=True)
    assert b.global_step == ref.global_step == 3 * spe
    for x, y in zip(jax.tree.leaves(b.state.params), jax.tree.leaves(ref.state.params), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in rows]
    assert strip(b.history) == strip(ref.history)


def test_entries_after_the_last_epoch_are_a_warning():
    c = base_config()
    c.data.source, c.data.size_schedule = "demo", ((0, 128), (3, 224))
    c.train.epochs = 1  # fine_tune: 2 data epochs
    with pytest.warns(UserWarning, match=r"data.size_schedule entries \[\(3, 224\)\] are ignored.*2 data epoch"):
        validate(c)
    c.train.epochs = 2  # 3 data epochs: 0, 1, 2 -- (3, 224) never applies
    with pytest.warns(UserWarning, match="data epoch"):
        validate(c)
    c.train.epochs = 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(c)
