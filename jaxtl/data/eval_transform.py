"""fastai's validation transform for prediction, the one path that ``Learner.predict``, ``jaxtl.predict`` (the
CLI and :class:`jaxtl.predict.Predictor`) and the data bundle's ``preprocess_eval`` share: decode, resize the
short side and centre-crop to ``size`` (``augment.eval_resize_crop``), scale to [0, 1], normalise."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxtl.data import augment, decode
from jaxtl.data.tf_import import tf


class EvalTransform:
    """``transform(image) -> float32 (size, size, 3)``; ``image`` a file path, encoded bytes or a uint8
    ``(h, w, 3)`` array. An unreadable file raises FileNotFoundError, an undecodable one ValueError, both naming
    the image."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        # one traced graph for every encoded image (eager TF would dispatch op by op)
        self._from_bytes = tf.function(lambda data: self._finish(decode.decode_rgb(data)), autograph=False,
                                       input_signature=[tf.TensorSpec([], tf.string)])

    def _finish(self, rgb: tf.Tensor) -> tf.Tensor:
        return augment.normalize(tf.cast(self._pixels(rgb), tf.float32) / 255.0, self.mean, self.std)

    def _pixels(self, rgb: tf.Tensor) -> tf.Tensor:
        return augment.eval_resize_crop(rgb, self.size)

    def pixels(self, image: str | os.PathLike | bytes | np.ndarray) -> np.ndarray:
        """The transform before normalisation: uint8 ``(size, size, 3)`` (what ``jaxtl.export``'s artifact
        takes)."""
        return self._run(image, normalised=False)

    def __call__(self, image: str | os.PathLike | bytes | np.ndarray) -> np.ndarray:
        return self._run(image, normalised=True)

    def _run(self, image: str | os.PathLike | bytes | np.ndarray, normalised: bool) -> np.ndarray:
        finish = self._finish if normalised else self._pixels
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"an image array must be (h, w, 3) uint8, got shape {image.shape}")
            return finish(tf.convert_to_tensor(image.astype(np.uint8))).numpy()
        name = "the given bytes" if isinstance(image, bytes | bytearray) else str(image)
        try:
            data = decode.load_bytes(image)
        except OSError as e:
            raise FileNotFoundError(f"cannot read image {name}: {e.strerror or e}") from e
        try:
            if not normalised:
                return self._pixels(decode.decode_rgb(tf.constant(data))).numpy()
            return self._from_bytes(tf.constant(data)).numpy()
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(f"cannot decode image {name}: {decode.tf_error_message(e)}") from e
