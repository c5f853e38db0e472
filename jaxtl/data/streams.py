"""The raw element streams of one process behind ``DataBundle`` (``jaxtl.data.pipeline``): image files
(:class:`FileStream`) or a TFDS dataset (:class:`TfdsStream`); the bundle adds the transforms and batching.

A stream describes one epoch as a function of the epoch *tensor* (``epoch_elements``), so the bundle can build
one tf.data pipeline for the whole run (``Dataset.range(first, ...).flat_map(...)``) instead of one per epoch:
every random number of an epoch comes from ``epoch_key(base, epoch)``, a stateless key computed in the graph.
"""

from __future__ import annotations

import numpy as np

from jaxtl.data import decode, tfds_items
from jaxtl.data.decode import graph_fn
from jaxtl.data.tf_import import tf


def key(*parts: int) -> np.ndarray:
    """A ``[2]`` int64 stateless-RNG seed derived from non-negative integers."""
    state = np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(2, np.uint32)
    return state.astype(np.int64)


def epoch_key(base: np.ndarray, epoch: tf.Tensor) -> tf.Tensor:
    """The ``[2]`` stateless seed of stream ``base`` in ``epoch`` (an int64 tensor), computed in the graph."""
    return tf.random.experimental.stateless_fold_in(tf.constant(base, tf.int64), epoch)


def seed_scalar(k: tf.Tensor) -> tf.Tensor:
    """An int64 scalar seed drawn from the stateless key ``k`` (for ``Dataset.shuffle``, which takes one)."""
    return tf.random.stateless_uniform([], k, minval=None, maxval=None, dtype=tf.int64)


STREAM_CROP, STREAM_BATCH, STREAM_SHUFFLE = 1, 2, 3  # independent random streams of an epoch
STREAM_TTA, STREAM_TTA_BATCH = 4, 5  # test-time augmentation's crops and batch draws (per pass)


class Stream:
    """Yields raw training/validation elements for one process; DataBundle adds the transforms."""

    cache: bool = False
    decoded: bool = False  # training elements are decoded uint8 images (else encoded bytes)

    def prepare(self) -> None:
        """Build the datasets every epoch reads (a cache, a TFDS split) outside the per-epoch function: the
        bundle calls this before tracing ``epoch_elements``, so all epochs share them (and their cache)."""

    def epoch_elements(self, epoch: tf.Tensor, seed: int, n_items: int, start: tf.Tensor) -> tf.data.Dataset:
        """Dataset of ``(bytes or uint8 image, label int32, position int64)`` for positions ``start ..
        n_items-1`` of ``epoch`` (int64 tensors: this runs inside ``flat_map``, traced once per pipeline)."""
        raise NotImplementedError

    def valid_elements(self) -> tuple[tf.data.Dataset, bool, int]:
        """``(dataset of (bytes or image, label int32), decoded?, number of elements)``."""
        raise NotImplementedError

    def train_elements(self) -> tuple[tf.data.Dataset, bool, int]:
        """This process's training elements once, in a fixed order, as :meth:`valid_elements` (the linear probe's
        features)."""
        raise NotImplementedError

    def valid_items(self) -> list[tuple[str, int]]:
        raise NotImplementedError


def _shuffled_positions(ds: tf.data.Dataset, buffer: int, epoch: tf.Tensor, seed: int, pi: int, n_items: int,
                        start: tf.Tensor) -> tf.data.Dataset:
    """``ds`` shuffled for ``epoch`` (seeded from (seed, epoch, process)), cut to ``n_items``, numbered, from
    ``start``: ``(x, label, position)``."""
    shuffle_seed = seed_scalar(epoch_key(key(seed, pi, STREAM_SHUFFLE), epoch))
    ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False).take(n_items)
    return ds.enumerate().skip(start).map(graph_fn(lambda k, e: (e[0], e[1], k)))


class FileStream(Stream):
    def __init__(self, train: list[tuple[str, int]], valid: list[tuple[str, int]], pi: int, pc: int,
                 cache: bool, num_parallel: int | None) -> None:
        self.train_paths = np.array([p for p, _ in train], dtype=object)
        self.train_labels = np.array([y for _, y in train], np.int32)
        self.valid = valid[pi::pc]
        self.pi, self.pc, self.cache, self.num_parallel = pi, pc, cache, num_parallel
        self.decoded = cache  # the cached shard holds decoded images
        self._decoded: tf.data.Dataset | None = None

    def prepare(self) -> None:
        if self.cache:
            self._decoded_shard()

    def _decoded_shard(self) -> tf.data.Dataset:
        if self._decoded is None:  # this process's fixed shard, decoded once and kept in memory
            ds = tf.data.Dataset.from_tensor_slices((self.train_paths[self.pi::self.pc].astype(str),
                                                     self.train_labels[self.pi::self.pc]))
            ds = ds.map(graph_fn(lambda p, y: (decode.decode_rgb(tf.io.read_file(p)), y)),
                        num_parallel_calls=self.num_parallel, deterministic=True)
            self._decoded = ds.cache()
        return self._decoded

    def epoch_elements(self, epoch: tf.Tensor, seed: int, n_items: int, start: tf.Tensor) -> tf.data.Dataset:
        if self.cache:
            n_shard = len(self.train_paths[self.pi::self.pc])
            assert self._decoded is not None, "call prepare() first"
            return _shuffled_positions(self._decoded, n_shard, epoch, seed, self.pi, n_items, start)
        # a permutation of all items, the same on every process (its key has no process index), dealt round-robin
        n = len(self.train_paths)
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=epoch_key(key(seed, STREAM_SHUFFLE), epoch))
        mine = order[self.pi::self.pc][:n_items]
        paths, labels = tf.constant(self.train_paths.astype(str)), tf.constant(self.train_labels)
        ds = tf.data.Dataset.from_tensor_slices((mine, tf.range(n_items, dtype=tf.int64))).skip(start)
        return ds.map(graph_fn(lambda i, k: (tf.io.read_file(tf.gather(paths, i)), tf.gather(labels, i), k)))

    def valid_elements(self) -> tuple[tf.data.Dataset, bool, int]:
        paths = [p for p, _ in self.valid]
        labels = np.array([y for _, y in self.valid], np.int32)
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), labels))
        return ds.map(graph_fn(lambda p, y: (tf.io.read_file(p), y))), False, len(paths)

    def valid_items(self) -> list[tuple[str, int]]:
        return list(self.valid)

    def train_elements(self) -> tuple[tf.data.Dataset, bool, int]:
        if self.cache:
            return self._decoded_shard(), True, len(self.train_paths[self.pi::self.pc])
        paths, labels = self.train_paths[self.pi::self.pc].astype(str), self.train_labels[self.pi::self.pc]
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), labels))
        return ds.map(graph_fn(lambda p, y: (tf.io.read_file(p), y))), False, len(paths)


class TfdsStream(Stream):
    """Examples of a :class:`jaxtl.data.tfds_items.TfdsPlan`: each side is a split string, a mask over its
    read positions and per-position labels (or a feature remapped in the graph)."""

    def __init__(self, plan: tfds_items.TfdsPlan, image_key: str, pi: int, pc: int, cache: bool,
                 shuffle_buffer: int) -> None:
        self.plan, self.image_key = plan, image_key
        self.pi, self.pc, self.cache, self.shuffle_buffer = pi, pc, cache, shuffle_buffer
        self.num_valid_local = len(range(pi, plan.num_valid, pc))  # Dataset.shard keeps elements pi, pi+pc, ...
        self._train_base: tf.data.Dataset | None = None
        self._valid_items: list[tuple[str, int]] | None = None

    def _split(self, valid: bool) -> tf.data.Dataset:
        """``(image bytes, class index, tfds_id)`` of one side, this process's shard."""
        import tensorflow_datasets as tfds

        plan = self.plan
        split, mask = (plan.valid_split, plan.valid_mask) if valid else (plan.train_split, plan.train_mask)
        labels, remap = tfds_items.label_tensor(plan, valid)
        decoders = {k: tfds.decode.SkipDecoding() for k, f in plan.builder.info.features.items()
                    if isinstance(f, tfds.features.Image)}
        cfg = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=None)
        ds = plan.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders, read_config=cfg).enumerate()
        ik, lk = self.image_key, plan.label_key

        def label(i: tf.Tensor, e: dict[str, tf.Tensor]) -> tf.Tensor:
            if labels is not None:
                return tf.gather(labels, i)
            return tf.gather(remap, tf.cast(e[lk], tf.int32))

        if mask is not None:
            keep = tf.constant(mask)
            ds = ds.filter(graph_fn(lambda i, e: tf.gather(keep, i)))
        ds = ds.map(graph_fn(lambda i, e: (e[ik], label(i, e), e["tfds_id"])))
        return ds.shard(self.pc, self.pi)

    def prepare(self) -> None:
        if self._train_base is None:
            base = self._split(False).map(graph_fn(lambda x, y, i: (x, y)))
            self._train_base = base.cache() if self.cache else base

    def epoch_elements(self, epoch: tf.Tensor, seed: int, n_items: int, start: tf.Tensor) -> tf.data.Dataset:
        assert self._train_base is not None, "call prepare() first"
        return _shuffled_positions(self._train_base, self.shuffle_buffer, epoch, seed, self.pi, n_items, start)

    def valid_elements(self) -> tuple[tf.data.Dataset, bool, int]:
        if self.plan.valid_split is None:
            empty = tf.data.Dataset.from_tensor_slices((tf.zeros([0], tf.string), tf.zeros([0], tf.int32)))
            return empty, False, 0
        return self._split(True).map(graph_fn(lambda x, y, i: (x, y))), False, self.num_valid_local

    def train_elements(self) -> tuple[tf.data.Dataset, bool, int]:
        self.prepare()
        assert self._train_base is not None
        return self._train_base, False, len(range(self.pi, self.plan.num_train, self.pc))

    def valid_items(self) -> list[tuple[str, int]]:
        if self._valid_items is None:  # one pass over the split's ids and labels (image bytes not decoded)
            if self.plan.valid_split is None:
                self._valid_items = []
            else:
                ds = self._split(True).map(graph_fn(lambda x, y, i: (i, y)))
                self._valid_items = [(i.decode(), int(y)) for i, y in ds.as_numpy_iterator()]
        return self._valid_items
