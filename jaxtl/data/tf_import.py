"""The one place jaxtl imports TensorFlow (tf.data and tf.image are jaxtl's only uses of it).

Every ``jaxtl.data`` module that runs TF ops takes ``tf`` from here, so ``import jaxtl``, the models, the train step
and ``jaxtl.data.sources`` (the list of sources, labelling and the split) work where TensorFlow is not installed --
an accelerator machine that only trains on prepared batches, or ``scripts/bench_train.py``.
"""

import sys
import types


def _import_tensorflow() -> types.ModuleType:
    """``import tensorflow`` without its eager ``import keras.src.optimizers`` (TF's ``__init__`` loads Keras'
    optimisers so that Keras SavedModels can find them: ~0.8 s of a ~2.7 s import, Keras and matplotlib with it).
    jaxtl uses tf.data and tf.image only. The stand-in module lives only during the import, so a later
    ``import keras`` loads the real one (and registers its optimisers then)."""
    name = "keras.src.optimizers"
    if "tensorflow" in sys.modules or name in sys.modules:
        import tensorflow

        return tensorflow
    stand_in = sys.modules[name] = types.ModuleType(name)
    try:
        try:
            import tensorflow
        except ModuleNotFoundError as e:
            if e.name != "tensorflow":
                raise
            raise ModuleNotFoundError(
                "jaxtl's input pipeline (jaxtl.data) needs TensorFlow for tf.data/tf.image, and it is not installed; "
                "`pip install -e .` installs it (the models, the train step and scripts/bench_train.py do not need it)",
                name="tensorflow",
            ) from e
    finally:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
    return tensorflow


tf = _import_tensorflow()
