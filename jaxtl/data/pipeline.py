"""``DataBundle``: the tf.data input pipeline behind the training engine (contract in docs/design.md; built by
``jaxtl.data.build.build_data``).

Training epoch ``e`` on process ``i`` of ``n`` (all epochs of a run in one dataset: ``Dataset.range(first,
...).flat_map(epoch)``, the epoch an int64 tensor; every key below is ``streams.epoch_key(base, e)``, computed in
the graph):

1. order: files -- a permutation of all training items (``tf.random.experimental.stateless_shuffle`` keyed on
   ``(seed, e)``: the same on every process), dealt round-robin (process ``i`` takes positions ``i, i+n, ...``)
   and cut to ``steps_per_epoch * batch_size``; with ``data.cache`` or TFDS -- the process's fixed shard through
   ``Dataset.shuffle`` seeded from ``(seed, e, i)`` (full-size buffer when cached, ``data.shuffle_buffer`` for
   TFDS).
2. per image (parallel map): RandomResizedCrop box from a stateless seed ``fold_in(key(seed, e, i), position)``,
   decode (JPEG: only the crop window), antialiased bilinear resize to ``size``, uint8.
3. per batch: the random draws of fastai's batch transforms (affine/warp, flip, lighting) from the seed
   ``fold_in(key', batch_index)`` (``augment.batch_aug_params``). Where they are applied is
   ``data.augment_device`` (``jaxtl.device_augment.augment_on_device``): on the device, the batch is sent as uint8
   with those draws and the train step applies them and the normalisation (``device_augment.BatchTransform``), as
   fastai runs its batch transforms on the GPU (1/4 of the bytes of float32, no per-pixel work on the host); on
   the host, the pipeline applies them (``augment.augment_batch``) and normalises, and sends float32.

``data.size_schedule`` (progressive resizing, ``jaxtl.data.sizes``): epoch ``e`` crops and validates at
``size_at(e)``; one pipeline covers the epochs of one size.

Every random number is a function of ``(seed, epoch, process, position)``, so ``start_step=k`` yields exactly
batches ``k, k+1, ...`` of the full epoch, whether the run's pipeline goes on or a new one starts there.
Validation: squish to ``size + xtra``, centre crop (uint8, the eval step normalises; normalised float32 when the
transforms run on the host); the process's share (items ``i::n``) is padded to the same number of batches on
every process with masked zeros. Every dataset gets :func:`options`
(deterministic order, autotuned parallelism within the configured ``data.num_workers``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from jaxtl.data import augment, decode, sizes, streams
from jaxtl.data.decode import graph_fn
from jaxtl.data.eval_transform import EvalTransform
from jaxtl.data.tf_import import tf

# jaxtl computes with JAX; keep TF (input pipeline only) off any GPU it might see.
try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised by the caller: leave it
    pass


class DataBundle:
    """Everything the engine needs from the data: classes, sizes and batch iterators (see module docstring)."""

    def __init__(
        self,
        *,
        classes: list[str],
        aug: augment.AugParams,
        batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_parallel: int | None,
        num_train: int,
        num_valid: int,
        source: streams.Stream,
        corrupt: dict[str, str],
        description: str,
        on_device: bool = False,
        size_schedule: sizes.Schedule = (),
    ) -> None:
        self.classes = classes
        self.aug = aug
        self.size = aug.size  # the final size (prediction, TTA); epochs follow size_schedule
        self.size_schedule = sizes.check_size_schedule(size_schedule, self.size)
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_parallel = num_parallel
        self.num_train = num_train
        self.num_valid = num_valid
        self.corrupt = corrupt  # {path: reason} of the files left out
        self.description = description
        self.on_device = on_device  # batch transforms in the step (uint8 batches) or here (normalised float32)
        self._source = source
        per_process = num_train // process_count
        self.steps_per_epoch = per_process // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set has {num_train} image(s), {per_process} per process, fewer than one batch of "
                f"{batch_size}; lower train.batch_size (global batch = per-process batch x {process_count} "
                f"process(es)) or add images ({description})")
        n_local_max = -(-num_valid // process_count)
        self.valid_steps = -(-n_local_max // batch_size)
        self._valid_ds: dict[int, tf.data.Dataset] = {}  # by size
        self._run_iter: Iterator[dict[str, np.ndarray]] | None = None  # the run-long training pipeline
        self._run_at: tuple[int, int] | None = None  # (epoch, step) of its next batch
        self._run_end: int | None = None  # its first epoch of another size (data.size_schedule), None: none
        self.pipelines_built = 0  # training pipelines built (one per run unless it is asked out of order)
        # fastai's validation transform for prediction (file path, bytes or uint8 array -> f32 (S, S, 3))
        self.preprocess_eval = EvalTransform(self.size, self.mean, self.std)

    def size_at(self, epoch: int | None) -> int:
        """The image side of data epoch ``epoch`` (``data.size_schedule``; None: ``data.size``, the final one)."""
        return self.size if epoch is None else sizes.size_at(self.size_schedule, epoch, self.size)

    # ------------------------------------------------------------------------------------- training
    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``start_step .. steps_per_epoch-1`` of ``epoch``. Transforms on the device: ``{"image": uint8
        (B,S,S,3), "label": i32 (B,), "affine": f32 (B,8), "flip": bool (B,), "lighting": f32 (B,2)}`` (the last
        three: the batch transforms' draws, ``augment.batch_aug_params``, which ``device_augment.BatchTransform``
        applies); on the host: ``{"image": f32 (B,S,S,3) augmented and normalised, "label": i32 (B,)}``.

        The batches come from the bundle's one run-long pipeline (epochs ``e, e+1, ...`` in one tf.data graph):
        asking for the epoch (and step) where the last batch taken left off reuses it, so the next epoch's
        batches are decoded while this one's validation runs; any other position (a resume, ``show_batch``, an
        abandoned epoch) or a new size (``data.size_schedule``: a pipeline covers the epochs of one size) starts a
        new one there. Either way batch ``k`` of an epoch is the same."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is outside [0, steps_per_epoch={self.steps_per_epoch}]")
        return self._from_run(epoch, start_step)

    def _from_run(self, epoch: int, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        for step in range(start_step, self.steps_per_epoch):
            if self._run_at != (epoch, step):
                self._run_iter = self._train_dataset(epoch, step).as_numpy_iterator()
                self.pipelines_built += 1
            self._run_at = None  # in case next() raises
            batch = next(self._run_iter)
            at = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
            self._run_at = at if self._run_end is None or at[0] < self._run_end else None
            yield batch

    def _train_dataset(self, first_epoch: int, start_step: int) -> tf.data.Dataset:
        """Epochs ``first_epoch, first_epoch + 1, ...`` (the first from batch ``start_step``) of one size as one
        dataset."""
        b, src = self.batch_size, self._source
        size = self.size_at(first_epoch)
        aug = dataclasses.replace(self.aug, size=size)
        self._run_end = sizes.next_change(self.size_schedule, first_epoch)
        n_items = self.steps_per_epoch * b
        crop_base = streams.key(self.seed, self.process_index, streams.STREAM_CROP)
        batch_base = streams.key(self.seed, self.process_index, streams.STREAM_BATCH)
        src.prepare()

        def epoch_items(epoch: tf.Tensor) -> tf.data.Dataset:
            start = tf.where(epoch == first_epoch, tf.constant(start_step * b, tf.int64), tf.constant(0, tf.int64))
            ds = src.epoch_elements(epoch, self.seed, n_items, start)
            return ds.map(graph_fn(lambda x, label, pos: (x, label, pos, epoch)))

        def item(x: tf.Tensor, label: tf.Tensor, pos: tf.Tensor, epoch: tf.Tensor) -> tuple[tf.Tensor, ...]:
            key = tf.random.experimental.stateless_fold_in(streams.epoch_key(crop_base, epoch), pos)
            return self._augment_item(x, key, src.decoded, size), label, pos, epoch

        def batch(img: tf.Tensor, label: tf.Tensor, pos: tf.Tensor, epoch: tf.Tensor) -> dict[str, tf.Tensor]:
            key = tf.random.experimental.stateless_fold_in(streams.epoch_key(batch_base, epoch[0]), pos[0] // b)
            return self._augment_batch(img, label, key, aug)

        last = 2**62 if self._run_end is None else self._run_end
        ds = tf.data.Dataset.range(first_epoch, last).flat_map(graph_fn(epoch_items))
        ds = ds.map(graph_fn(item), num_parallel_calls=self.num_parallel, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)  # every epoch holds whole batches: none spans two
        ds = ds.map(graph_fn(batch), num_parallel_calls=self.num_parallel, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(options(self.num_parallel))

    def _augment_item(self, x: tf.Tensor, key: tf.Tensor, decoded: bool, size: int) -> tf.Tensor:
        """RandomResizedCrop (box from ``key``) of an encoded or decoded image, resized to ``size``, uint8."""
        crop = lambda h, w: augment.random_resized_crop_params(key, h, w, self.aug.min_scale)
        img = decode.crop_box(x, crop(tf.shape(x)[0], tf.shape(x)[1])) if decoded else decode.decode_crop(x, crop)
        return augment.resize_uint8(img, size, size)

    def _augment_batch(self, img: tf.Tensor, label: tf.Tensor, key: tf.Tensor, aug: augment.AugParams
                       ) -> dict[str, tf.Tensor]:
        """The batch transforms' draws from ``key`` (applied here with ``augment_device=host``)."""
        if self.on_device:
            return {"image": img, "label": label, **augment.batch_aug_params(key, self.batch_size, aug)}
        x = augment.augment_batch(tf.cast(img, tf.float32) / 255.0, key, aug)
        return {"image": augment.normalize(x, self.mean, self.std), "label": label}

    def tta_batches(self, pass_index: int) -> Iterator[dict[str, np.ndarray]]:
        """Pass ``pass_index`` of test-time augmentation: this process's validation images in ``valid_items`` order
        with the *training* transforms (fastai's ``Learner.tta`` runs the validation set with ``split_idx=0``:
        RandomResizedCrop and the batch transforms), keys from ``(seed, process, pass, position)``; padded to
        ``valid_steps`` batches like :meth:`valid_batches` (the train batch's keys plus ``"mask"``)."""
        b, src = self.batch_size, self._source
        ds, decoded, n_local = src.valid_elements()
        crop_key = tf.constant(streams.key(self.seed, self.process_index, streams.STREAM_TTA, pass_index))
        batch_key = tf.constant(streams.key(self.seed, self.process_index, streams.STREAM_TTA_BATCH, pass_index))

        def item(pos: tf.Tensor, e: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, ...]:
            key = tf.random.experimental.stateless_fold_in(crop_key, pos)
            return self._augment_item(e[0], key, decoded, self.size), e[1], tf.constant(True), pos

        ds = ds.enumerate().map(graph_fn(item), num_parallel_calls=self.num_parallel, deterministic=True)
        pad = self.valid_steps * b - n_local
        if pad:
            zero = (tf.zeros([self.size, self.size, 3], tf.uint8), tf.constant(0, tf.int32), tf.constant(False))
            pads = tf.data.Dataset.range(n_local, n_local + pad).map(graph_fn(lambda k: (*zero, k)))
            ds = ds.concatenate(pads)

        def batch(img: tf.Tensor, label: tf.Tensor, mask: tf.Tensor, pos: tf.Tensor) -> dict[str, tf.Tensor]:
            key = tf.random.experimental.stateless_fold_in(batch_key, pos[0] // b)
            return {**self._augment_batch(img, label, key, self.aug), "mask": mask}

        ds = ds.batch(b).map(graph_fn(batch), num_parallel_calls=self.num_parallel, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(options(self.num_parallel)).as_numpy_iterator()

    # ----------------------------------------------------------------------------------- validation
    def valid_batches(self, epoch: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """All of this process's validation images once, in ``valid_items`` order, padded to ``valid_steps``
        batches: ``{"image": uint8 (B,S,S,3), "label": i32 (B,), "mask": bool (B,)}`` (mask False on padding;
        the eval step normalises the images; with the transforms on the host: normalised float32). ``S``: the size
        of data epoch ``epoch`` (``size_at``; None: ``data.size``)."""
        s = self.size_at(epoch)
        if s not in self._valid_ds:
            self._valid_ds[s] = self._build_eval(self._source.valid_elements(), s, self.valid_steps)
        return self._valid_ds[s].as_numpy_iterator()

    def train_eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """This process's training images once, in a fixed order, with the *validation* transform at ``data.size``,
        padded as :meth:`valid_batches` to the same number of batches on every process: the linear probe's
        features (``jaxtl.probe``)."""
        most = -(-self.num_train // self.process_count)  # the largest process share
        steps = -(-most // self.batch_size)
        return self._build_eval(self._source.train_elements(), self.size, steps, cache=False).as_numpy_iterator()

    def _build_eval(self, elements: tuple[tf.data.Dataset, bool, int], s: int, steps: int, cache: bool = True
                    ) -> tf.data.Dataset:
        """Elements -> the validation transform at side ``s``, batched, padded to ``steps`` batches (masked)."""
        b = self.batch_size
        ds, decoded, n_local = elements

        def item(x: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            img = x if decoded else decode.decode_rgb(x)
            return augment.eval_resize_crop(img, s), label, tf.constant(True)

        ds = ds.map(graph_fn(item), num_parallel_calls=self.num_parallel, deterministic=True)
        if self._source.cache and cache:
            ds = ds.cache()
        pad = steps * b - n_local
        if pad:
            zero = (tf.zeros([s, s, 3], tf.uint8), tf.constant(0, tf.int32), tf.constant(False))
            ds = ds.concatenate(tf.data.Dataset.from_tensors(zero).repeat(pad))

        def batch(img: tf.Tensor, label: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
            if not self.on_device:
                img = augment.normalize(tf.cast(img, tf.float32) / 255.0, self.mean, self.std)
            return {"image": img, "label": label, "mask": mask}

        ds = ds.batch(b).map(graph_fn(batch), num_parallel_calls=self.num_parallel, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(options(self.num_parallel))

    @property
    def valid_items(self) -> list[tuple[str, int]]:
        """(path or TFDS id, label index) of this process's validation images in ``valid_batches`` order
        (the whole validation set when ``process_count == 1``)."""
        return self._source.valid_items()

    def denormalize(self, images: np.ndarray) -> np.ndarray:
        """Batch images (uint8 as the pipeline yields them, or normalised floats) -> float32 in [0, 1] for plotting
        (same shape)."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            return images.astype(np.float32) / 255.0
        return augment.denormalize(images, self.mean, self.std)

    def __repr__(self) -> str:
        sized = f"size schedule {self.size_schedule}" if self.size_schedule else f"size {self.size}"
        return (f"DataBundle({self.num_train} train / {self.num_valid} valid images, {len(self.classes)} classes, "
                f"{sized}, batch {self.batch_size} x {self.steps_per_epoch} steps/epoch, "
                f"process {self.process_index}/{self.process_count}; {self.description})")


# ------------------------------------------------------------------------------------------ options
def options(num_parallel: int | None) -> tf.data.Options:
    """The ``tf.data.Options`` of every jaxtl dataset, set on purpose rather than left to defaults: element order
    deterministic (exact resume, the same batches on every run); the autotuner on, within ``data.num_workers``
    threads when that is set (``private_threadpool_size``: the pipeline's own pool, so ``num_workers=1`` really
    is one core, as ``scripts/bench_input.py --cores`` measures); map fusion and parallelisation on, and nothing
    that could reorder or drop elements (``experimental_slack`` off; no external state allowed to be ignored)."""
    opts = tf.data.Options()
    opts.deterministic = True
    opts.autotune.enabled = True
    opts.experimental_optimization.map_and_batch_fusion = True
    opts.experimental_optimization.map_parallelization = True
    opts.experimental_optimization.parallel_batch = True
    opts.experimental_slack = False
    if num_parallel is not None and num_parallel > 0:
        opts.threading.private_threadpool_size = int(num_parallel)
    return opts
