"""``build_data``: ``config.data`` -> the :class:`jaxtl.data.pipeline.DataBundle` of one process (the source's items,
the corrupt-file scan, the split, the class list; the pipeline itself is ``jaxtl.data.pipeline``)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from jaxtl.data import augment, decode, sources, streams, tfds_items
from jaxtl.data.pipeline import DataBundle
from jaxtl.data.sources import DataWarning
from jaxtl.data.tf_import import tf
from jaxtl.device_augment import augment_on_device

log = logging.getLogger("jaxtl.data")


def _warn(msg: str) -> None:
    warnings.warn(msg, DataWarning, stacklevel=3)


def _num_parallel(num_workers: int) -> int | None:
    if num_workers < 0:
        return tf.data.AUTOTUNE
    return num_workers or None  # 0 = sequential


def _drop_corrupt(split: sources.FileSplit, on_corrupt: str, cache_dir: str | None,
                  num_parallel: int | None) -> tuple[sources.FileSplit, dict[str, str]]:
    paths = [p for p, _ in split.train + split.valid]
    bad = decode.scan_images(paths, split.root, cache_dir=cache_dir, num_parallel=num_parallel or 1)
    if not bad:
        return split, {}
    lines = "\n  ".join(f"{p}: {why}" for p, why in bad.items())
    if on_corrupt == "error":
        raise ValueError(f"{len(bad)} unreadable image file(s) under {split.root}:\n  {lines}\n"
                         "Fix or delete them, or set data.on_corrupt=skip to leave them out.")
    if on_corrupt != "skip":
        raise ValueError(f"config field data.on_corrupt={on_corrupt!r} is not valid; choose 'skip' or 'error'")
    _warn(f"skipping {len(bad)} unreadable image file(s) under {split.root}:\n  {lines}")
    keep = lambda items: [(p, y) for p, y in items if p not in bad]
    return sources.FileSplit(keep(split.train), keep(split.valid), split.root, split.how, split.warnings), bad


def build_data(
    data_cfg: Any,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    label_func: Callable[[Any], Any] | None = None,
    files: Sequence[str | os.PathLike] | None = None,
    cache_dir: str | None = None,
    download: bool | None = None,
    image_key: str = "image",
) -> DataBundle:
    """Build the input pipeline for ``config.data`` (see the module docstring and docs/design.md).

    ``batch_size`` is per process. ``label_func`` overrides ``data.label`` (it gets the file name for
    ``source='name_func'``, the path for ``'folder'``); ``files`` is an explicit file list for ``'name_func'``;
    ``cache_dir`` holds the corrupt-scan cache and the demo images (default ``$JAXTL_CACHE_DIR`` or
    ``~/.cache/jaxtl``); ``download=True`` (default: config field ``data.download``) lets TFDS download and
    prepare a missing dataset;
    ``image_key`` names the TFDS image feature (the label comes from ``data.label``, e.g. ``feature:label``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    aug = augment.AugParams.from_config(data_cfg)
    for field in ("mean", "std"):
        v = tuple(getattr(data_cfg, field))
        if len(v) != 3:
            raise ValueError(f"config field data.{field} needs 3 values (RGB), got {v}")
    if any(float(x) <= 0 for x in data_cfg.std):
        raise ValueError(f"config field data.std must be positive, got {tuple(data_cfg.std)}")
    source_name = str(data_cfg.source)
    valid_pct, split_seed = float(data_cfg.valid_pct), int(data_cfg.seed)
    if not 0.0 <= valid_pct < 1.0:
        raise ValueError(f"config field data.valid_pct must be in [0, 1), got {valid_pct}")
    num_parallel = _num_parallel(int(data_cfg.num_workers))
    cache = bool(data_cfg.cache)
    corrupt: dict[str, str] = {}
    if label_func is not None and source_name not in ("folder", "name_func"):
        raise ValueError(f"label_func labels files of data.source='folder' or 'name_func', not {source_name!r}")
    if files is not None and source_name != "name_func":
        raise ValueError(f"files=... is a file list for data.source='name_func', not {source_name!r}")
    if source_name == "tfds":
        plan = tfds_items.plan_tfds(data_cfg, bool(data_cfg.download) if download is None else download, image_key)
        src = streams.TfdsStream(plan, image_key, process_index, process_count, cache,
                                 max(1, int(data_cfg.shuffle_buffer)))
        classes, num_train, num_valid, how = plan.classes, plan.num_train, plan.num_valid, plan.how
        if num_train == 0:
            raise ValueError(f"the training split of {how} is empty")
        if num_valid == 0:
            _warn(f"the validation set of {how} is empty; there will be no validation metrics")
    elif source_name in ("folder", "name_func", "demo"):
        if source_name == "demo":
            from jaxtl.data.demo import make_demo_folder

            root = make_demo_folder(int(data_cfg.demo_classes), int(data_cfg.demo_images), cache_dir=cache_dir)
            split = sources.folder_split(root, "parent", valid_pct, split_seed)
        elif source_name == "folder":
            if not data_cfg.path:
                raise ValueError("config field data.path is empty but data.source='folder' needs a folder; "
                                 "pass --config.data.path=/path/to/images")
            split = sources.folder_split(data_cfg.path, str(data_cfg.label), valid_pct, split_seed, label_func)
        else:
            split = sources.name_func_split(data_cfg.path or None, str(data_cfg.label), valid_pct, split_seed,
                                            label_func, files)
        split, corrupt = _drop_corrupt(split, str(data_cfg.on_corrupt), cache_dir, num_parallel)
        if corrupt and not split.train:
            first = next(iter(corrupt.items()))
            raise ValueError(f"none of the training images under {split.root} can be read: all {len(corrupt)} "
                             f"unreadable file(s) were skipped (e.g. {first[0]}: {first[1]}); fix the files or "
                             "point data.path at the right folder")
        classes, warns = sources.check_classes([y for _, y in split.train], [y for _, y in split.valid],
                                               split.root)
        for w in warns:
            _warn(w)
        index = {c: i for i, c in enumerate(classes)}
        train = [(p, index[y]) for p, y in split.train]
        valid = [(p, index[y]) for p, y in split.valid]
        src = streams.FileStream(train, valid, process_index, process_count, cache, num_parallel)
        num_train, num_valid, how = len(train), len(valid), f"{split.root}: {split.how}"
    else:
        raise ValueError(f"config field data.source={source_name!r} is not valid; "
                         "choose one of ['folder', 'name_func', 'tfds', 'demo']")
    bundle = DataBundle(
        classes=classes, aug=aug, batch_size=batch_size, seed=seed, process_index=process_index,
        process_count=process_count, mean=data_cfg.mean, std=data_cfg.std, num_parallel=num_parallel,
        num_train=num_train, num_valid=num_valid, source=src, corrupt=corrupt, description=how,
        on_device=augment_on_device(str(data_cfg.augment_device)), size_schedule=tuple(data_cfg.size_schedule))
    log.info("jaxtl.data: %r", bundle)
    return bundle
