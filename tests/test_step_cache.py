"""On-disk step cache (jaxtl/step_cache.py): a second run loads the saved executable instead of tracing and
compiling, gives bit-identical results, keys on everything the program depends on, and survives bad files and
unwritable folders. The Learner uses it only where the key can be complete."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import TinyBundle  # noqa: E402

from jaxtl import step_cache  # noqa: E402
from jaxtl.config import base_config  # noqa: E402
from jaxtl.learner import Learner  # noqa: E402
from jaxtl.models import create_model  # noqa: E402
from jaxtl.step_cache import StepCache  # noqa: E402


def _f(x, y):
    return {"s": jnp.tanh(x @ y).sum(0), "m": (x * 3.0).max()}


jitted = jax.jit(_f)
ARGS = (jnp.arange(12.0).reshape(3, 4) / 7, jnp.ones((4, 5)) * 0.25)


def files(d: Path) -> list[Path]:
    return sorted(d.glob("*.jaxexec")) if d.exists() else []


def assert_bit_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_second_cache_loads_the_saved_program_and_matches_jit(tmp_path):
    first = StepCache(jitted, "f", {"v": 1}, tmp_path)
    out1 = first(*ARGS)
    assert first.stats == {"loaded": 0, "compiled": 1, "saved": 1}
    (path,) = files(tmp_path)
    assert path.name.startswith("f-") and path == first.path(ARGS)
    first(*ARGS)  # same signature: the program held in memory, nothing new
    assert first.stats["compiled"] == 1 and first._cache_size() == 1

    second = StepCache(jitted, "f", {"v": 1}, tmp_path)  # as a new run would build it
    out2 = second(*ARGS)
    assert second.stats == {"loaded": 1, "compiled": 0, "saved": 0}
    assert_bit_equal(out1, jitted(*ARGS))
    assert_bit_equal(out2, jitted(*ARGS))


def test_key_changes_with_description_signature_and_environment(tmp_path, monkeypatch):
    base = StepCache(jitted, "f", {"lr": 1e-3}, tmp_path)
    k = base.key(ARGS)
    assert StepCache(jitted, "f", {"lr": 1e-3}, tmp_path).key(ARGS) == k
    assert StepCache(jitted, "f", {"lr": 2e-3}, tmp_path).key(ARGS) != k  # closed-over value
    assert StepCache(jitted, "g", {"lr": 1e-3}, tmp_path).key(ARGS) != k  # another step
    assert base.key((ARGS[0][:2], ARGS[1])) != k  # shape
    assert base.key((ARGS[0].astype(jnp.bfloat16), ARGS[1])) != k  # dtype
    assert base.key(({"a": ARGS[0]}, ARGS[1])) != k  # pytree structure
    with monkeypatch.context() as m:
        m.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
        assert base.key(ARGS) != k  # compiler flags
    with jax.default_matmul_precision("highest"):
        assert base.key(ARGS) != k  # a trace-affecting JAX setting
    assert base.key(ARGS) == k

    # a new signature in the same run: a second program and file, each loaded by a later run
    base(*ARGS)
    small = (ARGS[0][:2], ARGS[1])
    base(*small)
    assert base.stats["compiled"] == 2 and len(files(tmp_path)) == 2
    again = StepCache(jitted, "f", {"lr": 1e-3}, tmp_path)
    assert_bit_equal(again(*small), jitted(*small))
    assert again.stats == {"loaded": 1, "compiled": 0, "saved": 0}


_XLA_CACHE_RUN = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from jaxtl.step_cache import StepCache
from jaxtl.train import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
def f(x, w):
    y = x @ w
    return (y - y.mean(0)) * jax.lax.rsqrt(y.var(0) + 1e-5)
args = (jnp.arange(128.0).reshape(8, 16) / 100, jnp.ones((16, 16)) / 4)
cache = StepCache(jax.jit(f), "f", {"variant": sys.argv[2]}, Path(sys.argv[1]) / "jaxtl_steps")
out = np.asarray(cache(*args))
np.testing.assert_array_equal(out, np.asarray(jax.jit(f)(*args)))
print(cache.stats)
"""


def test_program_from_xlas_cache_is_not_saved(tmp_path):
    """A description that is new to the step cache but lowers to a module XLA's cache already holds: jaxlib 0.10
    serialises such a cache-loaded CPU executable without its kernels, and a later run that loaded the file
    failed with "NOT_FOUND: Function ... not found". Each run is a fresh process, as a user's runs are."""
    import subprocess

    def run(variant: str) -> str:
        r = subprocess.run([sys.executable, "-c", _XLA_CACHE_RUN, str(tmp_path / "xla"), variant],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip().splitlines()[-1]

    assert run("a") == str({"loaded": 0, "compiled": 1, "saved": 1})  # compiled here: saved
    assert run("b") == str({"loaded": 0, "compiled": 1, "saved": 0})  # XLA's cache supplied it: not saved
    assert run("b") == str({"loaded": 0, "compiled": 1, "saved": 0})  # and still runs right next time
    assert run("a") == str({"loaded": 1, "compiled": 0, "saved": 0})  # the good file still loads and runs
    assert [p.name.split("-")[0] for p in files(tmp_path / "xla" / "jaxtl_steps")] == ["f"]


def test_unreadable_file_is_recompiled_and_rewritten(tmp_path, caplog):
    StepCache(jitted, "f", {}, tmp_path)(*ARGS)
    (path,) = files(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # an interrupted copy, a full disk, ...
    cache = StepCache(jitted, "f", {}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="jaxtl.step_cache"):
        out = cache(*ARGS)
    assert "cannot load" in caplog.text and path.name in caplog.text
    assert cache.stats == {"loaded": 0, "compiled": 1, "saved": 1}
    assert_bit_equal(out, jitted(*ARGS))
    later = StepCache(jitted, "f", {}, tmp_path)
    later(*ARGS)
    assert later.stats["loaded"] == 1
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind


def test_unwritable_folder_still_runs(tmp_path, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    cache = StepCache(jitted, "f", {}, blocker / "jaxtl_steps")
    with caplog.at_level(logging.WARNING, logger="jaxtl.step_cache"):
        out = cache(*ARGS)
    assert "cannot write" in caplog.text
    assert cache.stats == {"loaded": 0, "compiled": 1, "saved": 0}
    assert_bit_equal(out, jitted(*ARGS))

    off = StepCache(jitted, "f", {}, None)  # no folder: plain jit behaviour
    assert_bit_equal(off(*ARGS), jitted(*ARGS))
    assert off.path(ARGS) is None and off.stats["compiled"] == 1


class NotOurs(nn.Module):  # a model whose code the source digest does not cover
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x)


def test_only_jaxtl_models_are_cached():
    assert step_cache.defined_in_jaxtl(create_model("resnet18", 3))
    assert not step_cache.defined_in_jaxtl(NotOurs())


# ------------------------------------------------------------------------------------------------ Learner
C = 3


@pytest.fixture(scope="module")
def init_vars():
    model = create_model("resnet18", C)
    return model, jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))


@pytest.fixture
def xla_dir(tmp_path):
    from jaxtl.train import enable_compilation_cache

    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    enable_compilation_cache(str(tmp_path / "xla"))
    yield tmp_path / "xla"
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def learner(init_vars, **train):
    cfg = base_config()
    cfg.model.arch = "resnet18"
    cfg.train.batch_size = 4
    for k, v in train.items():
        setattr(cfg.train, k, v)
    model, v = init_vars
    return Learner(model, v, TinyBundle(n_train=8, n_valid=4), cfg, None)


@pytest.mark.slow
def test_learner_second_run_loads_every_step_and_trains_identically(init_vars, xla_dir):
    first = learner(init_vars)
    first.freeze()
    rows1 = first.fit_one_cycle(1, 1e-3)
    probs1 = first.predict(first.data.xv[:3])
    assert isinstance(first._train_step, StepCache) and first._train_step.stats["compiled"] == 1
    names = sorted(p.name.split("-")[0] for p in files(xla_dir / step_cache.SUBDIR))
    assert names == ["eval", "predict", "train"]

    second = learner(init_vars)  # a new run of the same config
    second.freeze()
    rows2 = second.fit_one_cycle(1, 1e-3)
    probs2 = second.predict(second.data.xv[:3])
    for step in (second._train_step, second._eval, second._predict):
        assert step.stats == {"loaded": 1, "compiled": 0, "saved": 0}
    assert [r["train_loss"] for r in rows1] == [r["train_loss"] for r in rows2]
    assert [r["valid_loss"] for r in rows1] == [r["valid_loss"] for r in rows2]
    assert_bit_equal(first.variables, second.variables)
    assert_bit_equal(probs1, probs2)

    # a different phase (unfrozen body) or learning rate is a different program: compiled, not loaded
    second.unfreeze()
    second.fit_one_cycle(1, 1e-3)
    third = learner(init_vars)
    third.freeze()
    third.fit_one_cycle(1, 2e-3)
    assert second._train_step.stats["compiled"] == 1 and third._train_step.stats["compiled"] == 1
    assert len([p for p in files(xla_dir / step_cache.SUBDIR) if p.name.startswith("train-")]) == 3


@pytest.mark.slow
def test_learner_uses_plain_jit_when_the_cache_is_off_or_cannot_be_keyed(init_vars, xla_dir):
    for train in ({"step_cache": False}, {"parallel": "pmap"}):
        learn = learner(init_vars, **train)
        learn.fit_one_cycle(1, 1e-3)
        assert not isinstance(learn._train_step, StepCache) and not isinstance(learn._eval, StepCache)
    assert files(xla_dir / step_cache.SUBDIR) == []


def test_learner_without_persistent_cache_does_not_write(init_vars, tmp_path):
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        learn = learner(init_vars)
        assert not isinstance(learn._eval, StepCache)
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
