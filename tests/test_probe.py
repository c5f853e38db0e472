"""The linear probe (``train.recipe = "linear_probe"``, ``jaxtl.probe``): features against the body run image by
image, the head's first step against a NumPy cross-entropy, the merged model against the probe's own validation,
the body untouched, the config's unread fields, exact resume and ``Learner.load`` of the head-only checkpoints."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxtl import probe
from jaxtl.config import ConfigWarning, base_config, ignored_run_fields, validate
from jaxtl.learner import Learner, run_recipe


def _folder(root: Path, n_train: int = 10, n_valid: int = 3) -> None:
    """Two classes of noisy images, dark and bright: separable by the pooled features of any body."""
    rs = np.random.RandomState(0)
    for split, n in (("train", n_train), ("valid", n_valid)):
        for ci, cls in enumerate(("dark", "light")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = (rs.rand(40, 44, 3) * 90 + ci * 140).astype(np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")


def cfg(tmp: Path, head: str = "fastai", **train):
    c = base_config()
    c.data.path, c.data.size = str(tmp / "imgs"), 32
    c.model.arch, c.model.head = "resnet18", head
    c.train.recipe, c.train.epochs, c.train.batch_size, c.train.lr = "linear_probe", 2, 4, 1e-2
    c.train.compile_cache_dir = str(tmp / "xla")
    for k, v in train.items():
        setattr(c.train, k, v)
    validate(c)
    return c


@pytest.fixture
def imgs(tmp_path):
    _folder(tmp_path / "imgs")
    return tmp_path


def _concat_pool(f: np.ndarray) -> np.ndarray:  # fastai's AdaptiveConcatPool2d: [max, mean] over h, w
    return np.concatenate([f.max(axis=(1, 2)), f.mean(axis=(1, 2))], axis=-1)


def test_features_are_the_body_on_each_validation_transformed_image(imgs):
    learn = Learner.from_config(cfg(imgs), None)
    data = probe.feature_data(learn)
    paths = [str(p) for p in learn.data._source.train_paths]  # this process's items in their fixed order
    assert data.train_x.shape == (20, 1024) and data.steps_per_epoch == 5 and data.valid_x.shape == (8, 1024)
    v = learn.variables
    with jax.default_matmul_precision("highest"):
        for x_rows, items in ((data.train_x, paths), (data.valid_x[data.valid_mask], [p for p, _ in
                                                                                      learn.data.valid_items])):
            images = np.stack([learn.data.preprocess_eval(p) for p in items])  # EvalTransform, one image at a time
            body = np.asarray(learn.model.apply(v, images, False, method="features"))
            np.testing.assert_allclose(x_rows, _concat_pool(body), rtol=1e-4, atol=1e-4)
    labels = [y for _, y in learn.data.valid_items]
    np.testing.assert_array_equal(data.valid_y[data.valid_mask], labels)
    orders = [np.concatenate([b["label"] for b in data.train_batches(e)]) for e in (0, 1)]
    assert sorted(orders[0]) == sorted(data.train_y) and not np.array_equal(orders[0], orders[1])


def test_large_features_stream_to_a_file_in_the_work_dir(imgs, monkeypatch):
    learn = Learner.from_config(cfg(imgs), imgs / "run")
    held = probe.feature_data(learn)
    monkeypatch.setattr(probe, "IN_MEMORY_BYTES", 3 * 4 * 1024)  # 3 rows of 1024 floats: spill from batch 1 on
    spilled = probe.feature_data(learn)
    assert isinstance(spilled.train_x, np.memmap) and isinstance(spilled.valid_x, np.memmap)
    assert (imgs / "run" / "probe_features" / "p0.train.f32").stat().st_size == 20 * 1024 * 4
    np.testing.assert_array_equal(spilled.train_x, held.train_x)
    np.testing.assert_array_equal(spilled.valid_x, held.valid_x)
    for a, b in zip(spilled.train_batches(3), held.train_batches(3), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_probe_trains_the_head_on_the_features_and_the_full_model_agrees(imgs, capsys):
    """Linear head: the first step's loss is NumPy's cross-entropy of the first batch's features; afterwards the
    full model (body + the probe's head) validates to the probe's last row, the body is bit-identical, and the
    rows are in the table and history.csv."""
    c = cfg(imgs, head="linear", epochs=3)
    c.data.size_schedule = ((0, 24), (5, 32))  # not read by the probe (a warning): everything stays at data.size
    learn = Learner.from_config(c, imgs / "run")
    body_before = jax.tree.map(np.asarray, learn.variables["params"]["body"])
    head0 = jax.tree.map(np.asarray, learn.variables["params"]["head"]["fc"])
    data = probe.feature_data(learn)
    first = next(data.train_batches(0))
    logits = first["image"].astype(np.float64) @ head0["kernel"] + head0["bias"]
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(
        1, keepdims=True)
    want = -logp[np.arange(4), first["label"]].mean()

    summary = run_recipe(learn)
    assert summary["recipe"] == "linear_probe" and len(learn.history) == 3
    assert learn.step_losses[0] == pytest.approx(want, rel=1e-5)
    for k, x in zip(jax.tree.leaves(learn.variables["params"]["body"]), jax.tree.leaves(body_before), strict=True):
        assert np.asarray(k).tobytes() == x.tobytes()
    assert not np.allclose(np.asarray(learn.variables["params"]["head"]["fc"]["kernel"]), head0["kernel"])
    assert learn.data.size_at(learn.data_epoch) == 32 and "size" not in learn.columns
    full = learn.validate()
    last = learn.history[-1]
    assert full["valid_loss"] == pytest.approx(last["valid_loss"], rel=1e-4, abs=1e-5)
    assert full["error_rate"] == pytest.approx(last["error_rate"]) and last["error_rate"] < 0.5
    assert learn.history[-1]["train_loss"] < learn.history[0]["train_loss"]
    with open(imgs / "run" / "history.csv") as f:
        assert len(list(csv.reader(f))) == 4
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "time"] in table
    assert [r[0] for r in table if r and r[0].isdigit()] == ["0", "1", "2"]

    again = Learner.from_config(c, imgs / "run")  # Learner.load: the checkpoint holds the head; the body stays
    again.load(best=False)  # the last epoch (the best one by error_rate may be earlier)
    paths = [p for p, _ in learn.data.valid_items]
    np.testing.assert_allclose(again.predict(paths), learn.predict(paths), atol=1e-6)


@pytest.mark.slow
def test_probe_resume_equals_the_uninterrupted_run(imgs, monkeypatch):
    """A probe stopped by the full Learner's ``request_stop`` (what its SIGINT handler calls) in its second epoch
    and resumed: bit-equal head (fastai head: its BatchNorm and dropout; EMA on) and history."""
    ref = Learner.from_config(cfg(imgs, ema_decay=0.9), imgs / "ref")
    run_recipe(ref)
    a = Learner.from_config(cfg(imgs, ema_decay=0.9), imgs / "run")
    batches = probe.FeatureData.train_batches

    def stop_at(self, epoch, start_step=0):
        for i, b in enumerate(batches(self, epoch, start_step), start_step):
            if (epoch, i) == (1, 2):
                a.request_stop()
            yield b

    monkeypatch.setattr(probe.FeatureData, "train_batches", stop_at)
    run_recipe(a)
    monkeypatch.undo()
    assert a.stopped_early and a.stop_reason == "interrupted" and a.global_step == 8
    b = Learner.from_config(cfg(imgs, ema_decay=0.9), imgs / "run")
    run_recipe(b, resume=True)
    assert b.global_step == ref.global_step == 10
    for part in ("params", "batch_stats"):
        for x, y in zip(jax.tree.leaves(getattr(b.state, part)), jax.tree.leaves(getattr(ref.state, part)),
                        strict=True):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(jax.tree.leaves(b.state.ema), jax.tree.leaves(ref.state.ema), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in rows]
    assert strip(b.history) == strip(ref.history)


def test_fields_the_probe_does_not_read_warn(tmp_path):
    c = base_config()
    c.data.source, c.train.recipe = "demo", "linear_probe"
    assert ignored_run_fields(c) == []
    c.train.mixup_alpha, c.train.train_bn, c.data.max_rotate, c.data.size_schedule = 0.4, False, 30.0, ((0, 224),)
    msgs = ignored_run_fields(c)
    for field in ("train.mixup_alpha", "train.train_bn", "data.max_rotate", "data.size_schedule"):
        assert any(m.startswith(f"config field {field}=") and "linear_probe" in m for m in msgs), (field, msgs)
    with pytest.warns(ConfigWarning, match="data.max_rotate"):
        validate(c)
    c.train.mixup_alpha, c.train.train_bn, c.data.size_schedule, c.train.tta = 0.0, True, (), 2  # TTA reads them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(c)
