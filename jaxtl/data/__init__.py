"""tf.data input pipeline: sources, decoding + corrupt-file scan, fastai augmentation, batching.

``build_data(config.data, batch_size, seed, process_index=0, process_count=1)`` -> :class:`DataBundle`::

    bundle.classes, bundle.num_train, bundle.num_valid, bundle.steps_per_epoch
    bundle.train_batches(epoch, start_step=0)  # {"image": f32 (B,S,S,3) normalised, "label": i32 (B,)}
    bundle.valid_batches()                     # + "mask": bool (B,), False on padding
    bundle.valid_items                         # [(path or TFDS id, label)] in valid_batches order
    bundle.preprocess_eval(path_or_bytes)      # f32 (S,S,3), the validation transform
    bundle.denormalize(images)                 # -> f32 in [0, 1] for plotting

``show_batch(bundle, "batch.png")`` writes a grid of augmented training images.
"""

import sys
import types


def _import_tensorflow() -> None:
    """``import tensorflow`` without its eager ``import keras.src.optimizers`` (TF's ``__init__`` loads Keras'
    optimisers so that Keras SavedModels can find them: ~0.8 s of a ~2.7 s import, Keras and matplotlib with it).
    jaxtl uses tf.data and tf.image only. The stand-in module lives only during the import, so a later
    ``import keras`` loads the real one (and registers its optimisers then)."""
    name = "keras.src.optimizers"
    if "tensorflow" in sys.modules or name in sys.modules:
        import tensorflow  # noqa: F401
        return
    stand_in = sys.modules[name] = types.ModuleType(name)
    try:
        import tensorflow  # noqa: F401
    finally:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]


_import_tensorflow()

from jaxtl.data.augment import AugParams, eval_size, random_resized_crop_params  # noqa: E402  (after TF's import)
from jaxtl.data.decode import scan_images  # noqa: E402
from jaxtl.data.demo import make_demo_folder  # noqa: E402
from jaxtl.data.pipeline import DataBundle, DataWarning, build_data  # noqa: E402
from jaxtl.data.show import show_batch  # noqa: E402
from jaxtl.data.sources import IMAGE_EXTENSIONS, is_cat, list_images, random_split, resolve_tfds  # noqa: E402

__all__ = [
    "IMAGE_EXTENSIONS", "AugParams", "DataBundle", "DataWarning", "build_data", "eval_size", "is_cat",
    "list_images", "make_demo_folder", "random_resized_crop_params", "random_split", "resolve_tfds",
    "scan_images", "show_batch",
]
