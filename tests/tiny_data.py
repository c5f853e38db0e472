"""An in-memory data bundle with the interface of ``jaxtl.data.build_data``'s, for engine/Learner tests.

The training order is a pure function of (seed, epoch), as the real pipeline's. ``hook(epoch, step, batch)`` (if set)
is called before each training batch is yielded and may return a replacement batch: tests use it to send
SIGINT or to corrupt a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


class TinyBundle:
    def __init__(self, n_train: int = 24, n_valid: int = 10, batch_size: int = 4, size: int = 32,
                 classes: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> None:
        rs = np.random.RandomState(seed)
        self.classes = list(classes)
        self.batch_size, self.size, self.seed = batch_size, size, seed
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        n_cls = len(classes)
        self.yt = rs.randint(0, n_cls, n_train).astype(np.int32)
        self.xt = rs.randn(n_train, size, size, 3).astype(np.float32) + self.yt[:, None, None, None] * 0.5
        self.yv = rs.randint(0, n_cls, n_valid).astype(np.int32)
        self.xv = rs.randn(n_valid, size, size, 3).astype(np.float32) + self.yv[:, None, None, None] * 0.5
        self.num_train, self.num_valid = n_train, n_valid
        self.steps_per_epoch = n_train // batch_size
        self.hook: Callable[[int, int, dict], dict | None] | None = None

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        perm = np.random.RandomState([self.seed, epoch]).permutation(self.num_train)
        b = self.batch_size
        for i in range(start_step, self.steps_per_epoch):
            idx = perm[i * b:(i + 1) * b]
            batch = {"image": self.xt[idx].copy(), "label": self.yt[idx].copy()}
            if self.hook is not None:
                batch = self.hook(epoch, i, batch) or batch
            yield batch

    def valid_batches(self, epoch: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        return self._padded(self.xv, self.yv)

    def train_eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        return self._padded(self.xt, self.yt)

    def _padded(self, xs: np.ndarray, ys: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        b = self.batch_size
        for i in range(0, len(ys), b):
            x, y = xs[i:i + b], ys[i:i + b]
            m = np.ones(len(x), bool)
            pad = b - len(x)
            if pad:
                x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
                y = np.concatenate([y, np.zeros(pad, np.int32)])
                m = np.concatenate([m, np.zeros(pad, bool)])
            yield {"image": x, "label": y, "mask": m}

    @property
    def valid_items(self) -> list[tuple[str, int]]:
        return [(f"valid_{i}", int(y)) for i, y in enumerate(self.yv)]

    def preprocess_eval(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32)

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(x) * 0.2 + 0.5, 0.0, 1.0)
