"""The test session is an entry point like ``jaxtl.main``: it applies jaxtl's XLA CPU flags before JAX starts its
backend (``import jaxtl`` itself changes nothing); subprocesses the tests start inherit them.

Where TensorFlow is not installed (an accelerator machine that only trains), the modules that exercise the tf.data
pipeline are not collected and tests marked ``tensorflow`` skip; everything else must pass there
(tests/test_tf_free.py proves the package imports without it)."""

import importlib.util

import pytest

from jaxtl.cpu_defaults import apply_cpu_defaults

apply_cpu_defaults()

HAVE_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
# Modules that import or drive jaxtl.data's tf.data pipeline at collection or in every case.
NEEDS_TENSORFLOW = ["data", "test_bad_inputs.py", "test_device_augment.py"]
collect_ignore = [] if HAVE_TENSORFLOW else NEEDS_TENSORFLOW


@pytest.fixture(autouse=True)
def _float32_matmuls_off_the_cpu():
    """On a GPU the default float32 matmul/conv is TF32 (and bf16 passes on TPU): the tests compare against float32
    references (PyTorch, NumPy) at float32 tolerances, so off the CPU they run at "highest" precision. On the CPU
    that is the default already, and nothing changes. (Subprocesses the tests start keep JAX's default.)"""
    import jax

    if jax.default_backend() == "cpu":
        yield
    else:
        with jax.default_matmul_precision("highest"):
            yield


def pytest_report_header(config: pytest.Config) -> str | None:
    if HAVE_TENSORFLOW:
        return None
    return (f"TensorFlow is not installed: not collecting {', '.join('tests/' + m for m in NEEDS_TENSORFLOW)}; "
            "tests marked 'tensorflow' skip")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_TENSORFLOW:
        return
    skip = pytest.mark.skip(reason="needs TensorFlow (jaxtl.data's tf.data pipeline), which is not installed")
    for item in items:
        if item.get_closest_marker("tensorflow"):
            item.add_marker(skip)
