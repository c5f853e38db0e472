"""Learner integration: history/CSV/TensorBoard, exact resume (SIGINT and max_steps), NaN stop, lr_find,
compile-once, pretrained + freeze from config, and the real data pipeline on a generated image folder."""

from __future__ import annotations

import csv
import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import TinyBundle  # noqa: E402

from jaxtl.config import base_config  # noqa: E402
from jaxtl.learner import Learner, run_recipe  # noqa: E402
from jaxtl.models import create_model  # noqa: E402

C = 3


def config(**train):
    cfg = base_config()
    cfg.model.arch = "resnet18"
    cfg.train.batch_size = 4
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """Identical programs compiled by successive Learners come from JAX's persistent cache (as in the CLI)."""
    from jaxtl.train import enable_compilation_cache

    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    enable_compilation_cache(str(tmp_path_factory.mktemp("xla")))
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


@pytest.fixture
def default_sigint():
    """SIGINT as an interactive program has it (Python's default handler). A job started in the background by a
    non-interactive shell (e.g. ``.ci/run &``) inherits SIGINT ignored, and the Learner leaves a program's own
    choice alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def init_vars():
    model = create_model("resnet18", C)
    return model, jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))


def make(init_vars, workdir=None, data=None, **train):
    model, v = init_vars
    return Learner(model, v, data or TinyBundle(n_train=12), config(**train), workdir)


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bit_equal(a, b):
    la, lb = host(a), host(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def strip_time(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in rows]


def test_history_csv_table_tensorboard_and_compile_once(init_vars, tmp_path, capsys):
    learn = make(init_vars, tmp_path)
    rows = learn.fit_one_cycle(2, 1e-3)
    assert len(rows) == 2 and learn.history == rows
    assert learn._train_step._cache_size() == 1  # one compilation for both epochs
    with open(tmp_path / "history.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "time"]
    assert [r[0] for r in table[1:]] == ["0", "1"]
    assert float(table[2][2]) == pytest.approx(rows[1]["valid_loss"], abs=1e-6)
    assert rows[1]["error_rate"] == pytest.approx(1 - rows[1]["accuracy"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "time"]
    assert learn.history_table().splitlines()[0] == out.splitlines()[0]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    assert learn._ckpt.all_steps() == [3, 6] and learn._ckpt.latest_step(best=True) in (3, 6)
    probs = learn.predict(learn.data.xv[:5])
    assert probs.shape == (5, C) and np.allclose(probs.sum(-1), 1, atol=1e-5)


REGULARISED = {"ema_decay": 0.9, "label_smoothing": 0.1, "mixup_alpha": 0.4, "cutmix_alpha": 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("at_batch,train", [(5, {}), (3, {}), (5, REGULARISED)])
def test_resume_after_sigint_equals_uninterrupted_run(init_vars, tmp_path, at_batch, train, default_sigint):
    """fine_tune(1) (frozen epoch + unfrozen epoch, 3 batches each) interrupted by a real SIGINT in the middle of
    the unfrozen phase (batch 5) or on the frozen epoch's last batch (3), then resumed by a new Learner:
    parameters, BatchNorm statistics, optimiser state, the weights' EMA and history are bit-identical (also with
    EMA, label smoothing and MixUp/CutMix on: their draws come from the step's key)."""
    ref = make(init_vars, tmp_path / "ref", **train)
    ref.fine_tune(1, freeze_epochs=1)
    assert not ref.stopped_early and len(ref.history) == 2

    data = TinyBundle(n_train=12)
    seen = []

    def interrupt(epoch, step, batch):
        seen.append((epoch, step))
        if len(seen) == at_batch:
            os.kill(os.getpid(), signal.SIGINT)

    data.hook = interrupt
    a = make(init_vars, tmp_path / "run", data, **train)
    a.fine_tune(1, freeze_epochs=1)
    assert a.stopped_early and a.stop_reason == "interrupted"
    assert a.global_step == at_batch and a._ckpt.latest_step() == at_batch
    assert len(a.history) == 1  # the frozen epoch completed (with its row) in both cases
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler removed after the fit

    b = make(init_vars, tmp_path / "run", **train)
    b.fine_tune(1, freeze_epochs=1, resume=True)
    assert not b.stopped_early and b.global_step == ref.global_step == 6
    assert_bit_equal(b.state.params, ref.state.params)
    assert_bit_equal(b.state.batch_stats, ref.state.batch_stats)
    assert_bit_equal(b.state.opt_state, ref.state.opt_state)
    assert_bit_equal(b.state.ema, ref.state.ema)
    assert (b.state.ema is None) == (not train)
    assert strip_time(b.history) == strip_time(ref.history)
    assert b.n_frozen_groups == 0


@pytest.mark.slow
def test_resume_after_max_steps_one_cycle(init_vars, tmp_path):
    ref = make(init_vars, tmp_path / "ref")
    ref.fit_one_cycle(2, 2e-3)
    a = make(init_vars, tmp_path / "run", max_steps=4)  # stops in the middle of the 2nd epoch
    a.fit_one_cycle(2, 2e-3)
    assert not a.stopped_early and a.global_step == 4 and len(a.history) == 2  # full epoch + partial row
    b = make(init_vars, tmp_path / "run")
    b.fit_one_cycle(2, 2e-3, resume=True)
    assert b.global_step == 6
    assert_bit_equal(b.state.params, ref.state.params)
    assert strip_time(b.history) == strip_time(ref.history)
    with open(tmp_path / "run" / "history.csv") as f:
        assert len(list(csv.reader(f))) == 3  # header + 2 full epochs (the partial row was replaced)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(init_vars, tmp_path, capsys):
    data = TinyBundle(n_train=12)

    def poison(epoch, step, batch):
        if epoch == 1 and step == 1:
            batch["image"][:] = np.nan
            return batch
        return None

    data.hook = poison
    learn = make(init_vars, tmp_path, data)
    learn.fit_one_cycle(3, 1e-3)
    assert learn.stopped_early
    msg = learn.stop_reason
    assert "loss is nan at step 5" in msg and "lr " in msg and "step 3" in msg, msg
    assert learn._ckpt.latest_step() == 3  # the end of epoch 0; nothing saved after the NaN
    assert len(learn.history) == 1
    assert "loss is nan" in capsys.readouterr().err


def test_lr_find_restores_state_and_writes_png(init_vars, tmp_path):
    learn = make(init_vars, tmp_path)
    learn.freeze()
    before = jax.tree.map(np.array, learn.par.to_host(learn.state))
    res = learn.lr_find(num_it=20)
    after = learn.par.to_host(learn.state)
    assert_bit_equal(after.params, before.params)
    assert_bit_equal(after.batch_stats, before.batch_stats)
    assert int(after.step) == int(before.step) and learn.data_epoch == 0 and learn.global_step == 0
    assert (tmp_path / "lr_find.png").stat().st_size > 0 and res.plot == tmp_path / "lr_find.png"
    # fastai's SchedExp sweep: lr_i = start * (end/start) ** (i/num_it)
    n = len(res.lrs)
    assert 6 <= n <= 20
    np.testing.assert_allclose(res.lrs, 1e-7 * (1e8) ** (np.arange(n) / 20), rtol=1e-5)
    assert res.lrs[0] <= res.valley <= res.lrs[-1]
    # stop_div: the sweep ends early once the smoothed loss exceeds 4x its minimum
    if n < 20:
        assert res.losses[-1] > 4 * min(res.losses[:-1]) or not np.isfinite(res.losses[-1])


def test_run_recipe_dispatch_and_freeze_semantics(init_vars, tmp_path):
    learn = make(init_vars, tmp_path, recipe="one_cycle", epochs=1)
    summary = run_recipe(learn)
    assert summary["recipe"] == "one_cycle" and set(summary) >= {"train_loss", "valid_loss", "error_rate"}
    learn.freeze_to(1)
    assert learn.n_frozen_groups == 1 and learn._reset_opt
    learn.unfreeze()
    assert learn.n_frozen_groups == 0


def test_freeze_keeps_body_bit_identical_with_real_optimizer(init_vars):
    """freeze() + fit with jaxtl.optim's fastai Adam: frozen conv kernels bit-identical, head and BatchNorm
    parameters move, running statistics of the frozen body move (train-mode BN, as fastai)."""
    learn = make(init_vars)
    learn.freeze()
    before = jax.tree.map(np.array, learn.variables)
    learn.fit_one_cycle(1, 1e-2)
    after = learn.variables
    body_b, body_a = before["params"]["body"], after["params"]["body"]
    for block, conv in (("layer4_1", "conv2"), ("layer1_0", "conv1")):
        assert np.asarray(body_a[block][conv]["kernel"]).tobytes() == body_b[block][conv]["kernel"].tobytes()
    assert np.asarray(body_a["conv1"]["kernel"]).tobytes() == body_b["conv1"]["kernel"].tobytes()
    assert not np.array_equal(np.asarray(body_a["bn1"]["scale"]), body_b["bn1"]["scale"])
    assert not np.array_equal(np.asarray(after["params"]["head"]["fc2"]["kernel"]),
                              before["params"]["head"]["fc2"]["kernel"])
    assert not np.allclose(np.asarray(after["batch_stats"]["body"]["layer1_0"]["bn1"]["mean"]),
                           before["batch_stats"]["body"]["layer1_0"]["bn1"]["mean"])


@pytest.mark.slow
def test_pmap_mode_single_device(init_vars, tmp_path):
    learn = make(init_vars, tmp_path, parallel="pmap", max_steps=2)
    learn.fit_one_cycle(1, 1e-3)
    assert learn.global_step == 2 and np.isfinite(learn.history[-1]["valid_loss"])
    b = make(init_vars, tmp_path, parallel="pmap")
    b.fit_one_cycle(1, 1e-3, resume=True)
    assert b.global_step == 3
    assert learn.predict(learn.data.xv[:2]).shape == (2, C)


def _write_folder(root: Path, n_per_class: int = 8, size: int = 40) -> None:
    from PIL import Image

    rs = np.random.RandomState(0)
    for split in ("train", "valid"):
        for ci, cls in enumerate(("ants", "bees")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_per_class if split == "train" else 3):
                arr = (rs.rand(size, size, 3) * 80 + ci * 120).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.jpg")


@pytest.mark.slow
def test_from_config_real_pipeline_pretrained_file(tmp_path):
    """Learner.from_config on a generated image folder (jaxtl.data.build_data) with pretrained weights from a
    jaxtl .safetensors file: body loaded, learner frozen; a fine_tune smoke run writes every output."""
    from jaxtl.convert import save_variables

    _write_folder(tmp_path / "imgs")
    model = create_model("resnet18", 1000, head="linear")
    pre = model.init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3)), train=False)
    save_variables(tmp_path / "r18.safetensors", jax.tree.map(np.asarray, pre), {"arch": "resnet18"})

    cfg = config(batch_size=4, epochs=1, freeze_epochs=1, max_steps=2)
    cfg.data.source, cfg.data.path, cfg.data.size = "folder", str(tmp_path / "imgs"), 32
    cfg.data.augment = False
    cfg.model.pretrained = str(tmp_path / "r18.safetensors")
    learn = Learner.from_config(cfg, workdir=tmp_path / "run")
    assert learn.classes == ["ants", "bees"] and learn.n_frozen_groups == 2
    np.testing.assert_array_equal(np.asarray(learn.variables["params"]["body"]["conv1"]["kernel"]),
                                  np.asarray(pre["params"]["body"]["conv1"]["kernel"]))
    summary = run_recipe(learn)
    assert summary["recipe"] == "fine_tune" and len(learn.history) == 2
    written = learn.write_report()
    for key in ("loss_curves", "confusion_matrix", "top_losses", "model"):
        assert written[key].exists(), key
    assert (tmp_path / "run" / "history.csv").exists() and (tmp_path / "run" / "checkpoints").is_dir()


@pytest.mark.slow
def test_learner_on_four_devices_jit_and_pmap():
    """Subprocess with 4 CPU devices: sharded-jit and pmap Learners fit, stop on max_steps, resume bit-equal to an
    uninterrupted run, validate, predict and lr_find."""
    import json
    import subprocess

    here = Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(here / "learner_multidevice.py")], env=env, capture_output=True,
                          text=True, timeout=1200, cwd=here.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    for mode in ("jit", "pmap"):
        r = out[mode]
        assert r["steps"] == [6, 4, 6] and r["resume_bit_equal"], (mode, r)
        assert r["valid_loss"][0] == r["valid_loss"][1]
        assert r["probs_shape"] == [5, 3] and r["probs_sum_err"] < 1e-5
        assert r["lr_find_steps"] == 6 and r["stopped"] == [False, False]


@pytest.mark.slow
def test_many_validations_on_four_devices_do_not_deadlock():
    """Regression for the all-reduce deadlock (tests/reliability/validate_multidevice.py): 26 validations of 12
    batches each under jit and pmap on 4 CPU devices; the old code (all eval programs in flight at once) aborted
    in XLA's rendezvous within ~150 such rounds on a loaded 2-core machine."""
    import subprocess

    here = Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(here / "reliability" / "validate_multidevice.py"), "25"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=here.parent)
    assert proc.returncode == 0 and "OK " in proc.stdout, proc.stderr[-3000:]
