"""Put this folder first on PYTHONPATH and Python starts as if TensorFlow, TFDS and Keras were not installed:
``import tensorflow`` raises ModuleNotFoundError and ``importlib.util.find_spec("tensorflow")`` is None (as on an
accelerator machine without them). Used by tests/test_tf_free.py and ``scripts/gpu_check.sh --cpu-dry-run``."""

import importlib.machinery
import sys

HIDDEN = ("tensorflow", "tensorflow_datasets", "keras", "tf_keras")


class _PathFinderWithoutTF(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):  # type: ignore[override]
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_PathFinderWithoutTF if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
