"""jaxtl without TensorFlow (issue: accelerators, point 4): ``import jaxtl``, the models, the train step, the
config checks and the entry points load and run where TensorFlow is not installed; TF is imported only by
``jaxtl.data``'s tf.data modules, and only when one of them is used.

``tests/no_tensorflow/sitecustomize.py`` makes a Python process see no TensorFlow/TFDS/Keras (``find_spec`` is
None, ``import`` fails), as on the GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_TF = ROOT / "tests" / "no_tensorflow"


def run_python(code: str, hide_tf: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    paths = ([str(NO_TF)] if hide_tf else []) + [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


TF_MODULES = "[m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'keras')]"


def test_package_model_train_step_and_config_run_without_tensorflow():
    r = run_python(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("tensorflow") is None  # the blocker works, so this test can fail
        try:
            import tensorflow  # noqa: F401
            raise SystemExit("tensorflow imported despite the blocker")
        except ModuleNotFoundError:
            pass
        import jax, jax.numpy as jnp, numpy as np, optax
        import jaxtl, jaxtl.data, jaxtl.data.sources, jaxtl.device_augment, jaxtl.learner, jaxtl.main, jaxtl.predict
        from jaxtl.config import base_config, validate
        from jaxtl.groups import trainable_mask
        from jaxtl.models import create_model
        from jaxtl.train import TrainState, make_train_step

        c = base_config(); c.data.source = "demo"
        validate(c)  # the choice lists (data sources, archs, optimisers, ...) need no TF
        for bad in ("data.source", "train.recipe"):
            c = base_config(); c.data.source = "demo"; exec(f"c.{{bad}} = 'nope'")
            try:
                validate(c)
                raise SystemExit(f"{{bad}}='nope' was accepted")
            except ValueError as e:
                assert bad in str(e), e

        model = create_model("resnet18", 3, "fastai")
        v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
        mask = trainable_mask(v["params"], 0, True)
        tx = optax.adam(1e-3)
        state = TrainState.create(v["params"], v["batch_stats"], tx, jax.random.PRNGKey(1))
        batch = {{"image": np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32),
                 "label": np.array([0, 1, 2, 0], np.int32)}}
        state, m = jax.jit(make_train_step(model, tx, mask))(state, batch)
        assert np.isfinite(float(m["loss"])), m

        try:
            from jaxtl.data import build_data  # noqa: F401
            raise SystemExit("jaxtl.data.build_data imported without TensorFlow")
        except ModuleNotFoundError as e:
            assert e.name == "tensorflow" and "pip install -e ." in str(e), e
        print("TF modules:", {TF_MODULES})
        print("ok")
    """, hide_tf=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    assert "TF modules: []" in r.stdout


@pytest.mark.tensorflow
def test_tensorflow_is_imported_only_when_the_pipeline_is_used():
    r = run_python(f"""
        import sys
        import jaxtl, jaxtl.data, jaxtl.data.sources, jaxtl.models, jaxtl.train, jaxtl.learner, jaxtl.main
        from jaxtl.config import base_config, validate
        c = base_config(); c.data.source = "demo"; validate(c)
        print("before:", {TF_MODULES})
        from jaxtl.data import build_data  # noqa: F401
        print("after:", "tensorflow" in sys.modules, "keras.src.optimizers" in sys.modules)
    """, hide_tf=False)
    assert r.returncode == 0, r.stderr
    assert "before: []" in r.stdout, r.stdout
    # TF is imported by the pipeline, without Keras' optimisers (jaxtl/data/tf_import.py)
    assert "after: True False" in r.stdout, r.stdout


def test_training_run_reports_missing_tensorflow_clearly(tmp_path):
    """A training run on a machine without TF stops with the install hint, not a bare traceback."""
    argv = ["jaxtl.main", "--config", "configs/demo.py", f"--workdir={tmp_path / 'w'}"]
    r = run_python(f"import runpy, sys; sys.argv = {argv!r}; runpy.run_module('jaxtl.main', run_name='__main__')",
                   hide_tf=True)
    assert r.returncode != 0
    assert "needs TensorFlow" in r.stderr and "pip install -e ." in r.stderr, r.stderr[-3000:]
