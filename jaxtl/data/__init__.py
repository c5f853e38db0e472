"""tf.data input pipeline: sources, decoding + corrupt-file scan, fastai augmentation, batching.

``build_data(config.data, batch_size, seed, process_index=0, process_count=1)`` -> :class:`DataBundle`::

    bundle.classes, bundle.num_train, bundle.num_valid, bundle.steps_per_epoch
    bundle.train_batches(epoch, start_step=0)  # {"image": uint8 (B,S,S,3), "label": i32 (B,), + the batch
                                               #  transforms' draws "affine", "flip", "lighting"} (data.augment_device
                                               #  = "host": {"image": f32 normalised, "label"})
    bundle.valid_batches(epoch=None)           # {"image", "label", "mask": bool (B,), False on padding}, at
                                               #  the size of data epoch `epoch` (data.size_schedule; bundle.size_at)
    bundle.tta_batches(i)                      # pass i of TTA: the validation images with the training
                                               #  transforms (train batch's keys + "mask")
    bundle.train_eval_batches()                # the training images once, fixed order, with the validation
                                               #  transform (the linear probe's features)
    bundle.valid_items                         # [(path or TFDS id, label)] in valid_batches order
    bundle.preprocess_eval(path_or_bytes)      # f32 (S,S,3), the validation transform
    bundle.denormalize(images)                 # -> f32 in [0, 1] for plotting

``show_batch(bundle, "batch.png")`` writes a grid of augmented training images.

The names below load their module on first use (PEP 562), so ``import jaxtl.data`` and ``jaxtl.data.sources`` (the
choice lists ``jaxtl.config`` validates against) do not import TensorFlow; the modules that run TF ops take it from
``jaxtl.data.tf_import``.
"""

import importlib
from typing import Any

_EXPORTS = {
    "AugParams": "augment", "eval_size": "augment", "random_resized_crop_params": "augment",
    "scan_images": "decode",
    "make_demo_folder": "demo",
    "DataBundle": "pipeline", "build_data": "build",
    "show_batch": "show",
    "IMAGE_EXTENSIONS": "sources", "DataWarning": "sources", "is_cat": "sources", "list_images": "sources",
    "random_split": "sources", "resolve_tfds": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxtl.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jaxtl.data.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
