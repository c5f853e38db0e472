"""Which TFDS examples train and validate, and their labels: the same ``data.label`` / ``data.valid_pct`` rules as
for image folders (``jaxtl/data/sources.py``).

Labels (``data.label``):

* ``is_cat`` / ``regex:<pattern>``: applied to the example's ``file_name`` feature, exactly as to a file's name
  (Oxford-IIIT Pet: ``Abyssinian_100.jpg``);
* ``feature:<name>``: a dataset feature, e.g. ``feature:label`` or ``feature:species``; a ``ClassLabel`` keeps all
  its names as classes (sorted), other scalar features their distinct values.

Splits:

* ``data.valid_pct > 0``: the splits named by ``data.tfds_split`` (default ``train+test``) are pooled and split at
  random with fastai's ``RandomSplitter(valid_pct, seed)`` over the examples sorted by ``file_name`` (by the
  pooled read order when the dataset has no ``file_name`` feature);
* ``data.valid_pct = 0``: the dataset's own ``train`` split and its first of ``validation``/``valid``/``val``/
  ``test``.

Labels by file name and random splits need one pass over the examples' small features (images are not decoded);
``ClassLabel`` features on the dataset's own splits need none (large datasets such as ImageNet: ``valid_pct=0``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxtl.data import sources
from jaxtl.data.decode import graph_fn
from jaxtl.data.tf_import import tf

FILE_NAME = "file_name"
VALID_SPLITS = ("validation", "valid", "val", "test")
NETWORK_PROBE = ("storage.googleapis.com", 443)  # TFDS's own bucket: reachable whenever TFDS can download


@dataclass
class TfdsPlan:
    """What ``_TfdsSource`` reads: for each side the split string, which positions of it (``None`` = all) and
    how to label them (``labels``: class index per position, or ``None`` = ``remap[feature]`` in the graph)."""

    builder: Any
    train_split: str
    valid_split: str | None
    train_mask: np.ndarray | None
    valid_mask: np.ndarray | None
    train_labels: np.ndarray | None
    valid_labels: np.ndarray | None
    label_key: str
    remap: np.ndarray  # feature value index -> class index (feature labels read in the graph)
    classes: list[str]
    num_train: int
    num_valid: int
    how: str


def default_tfds_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or str(Path.home() / "tensorflow_datasets")


def network_reachable(host_port: tuple[str, int] = NETWORK_PROBE, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to ``host_port`` opens within ``timeout`` s, else the reason it did not."""
    import socket

    try:
        with socket.create_connection(host_port, timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def download_tfds(name: str, data_dir: str) -> None:
    """Let TFDS download and prepare ``name``; offline, fail at once instead of TFDS's minutes of retries."""
    import tensorflow_datasets as tfds

    reason = network_reachable()
    if reason is not None:
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared under data_dir={data_dir} and cannot be "
                                f"downloaded: no network ({NETWORK_PROBE[0]} unreachable: {reason}).\n"
                                + sources.tfds_help(name, data_dir))
    try:
        tfds.builder(name, data_dir=data_dir).download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any TFDS/network failure becomes the same actionable message
        raise FileNotFoundError(f"TFDS could not download/prepare {name!r} into {data_dir}: {type(e).__name__}: "
                                f"{e}\n" + sources.tfds_help(name, data_dir)) from e


def _split_names(spec: str, available: dict[str, int], name: str) -> list[str]:
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    missing = [p for p in parts if p.split("[")[0] not in available]
    if not parts or missing:
        raise ValueError(f"config field data.tfds_split={spec!r} names split(s) {missing or [spec]} that TFDS dataset "
                         f"{name!r} does not have (it has {sorted(available)}); set --config.data.tfds_split to "
                         "those to pool, joined by '+' (e.g. 'train')")
    return parts


def _read_small_features(builder: Any, split: str, keys: list[str]) -> dict[str, np.ndarray]:
    """One pass over ``split`` reading only ``keys`` (no image bytes decoded)."""
    import tensorflow_datasets as tfds

    # SkipDecoding keeps image bytes undecoded (tfds.decode.PartialDecoding would too, but logs a deprecation)
    decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
                if isinstance(f, tfds.features.Image)}
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    ds = ds.map(graph_fn(lambda e: {k: e[k] for k in keys})).batch(4096)
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for batch in ds.as_numpy_iterator():
        for k in keys:
            out[k].append(batch[k])
    return {k: np.concatenate(v) if v else np.zeros([0]) for k, v in out.items()}


def _class_names(values: np.ndarray, feature: Any, label: str) -> list[str]:
    """Class name per example for a ``feature:`` label (ClassLabel names, else the value as text)."""
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.ClassLabel):
        return [feature.names[int(v)] for v in values]
    if values.ndim != 1:
        raise ValueError(f"config field data.label={label!r}: the feature is not a scalar (shape {values.shape[1:]})")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def plan_tfds(data_cfg: Any, download: bool, image_key: str = "image") -> TfdsPlan:
    """Resolve (and, with ``download``, fetch) ``data.tfds_name`` and decide its examples' labels and split."""
    import tensorflow_datasets as tfds

    name = str(data_cfg.tfds_name)
    data_dir = str(data_cfg.data_dir) or default_tfds_dir()
    if download:
        try:
            sources.resolve_tfds(name, data_dir)
        except FileNotFoundError:
            download_tfds(name, data_dir)
    path = sources.resolve_tfds(name, data_dir)
    builder = tfds.builder_from_directory(path)
    feats = builder.info.features
    label, valid_pct, seed = str(data_cfg.label), float(data_cfg.valid_pct), int(data_cfg.seed)
    if image_key not in feats:
        raise ValueError(f"TFDS dataset {name!r} has features {list(feats.keys())}; jaxtl needs an image feature "
                         f"{image_key!r} (build_data(image_key=...))")
    by_feature = label.startswith("feature:")
    label_key = label[len("feature:"):] if by_feature else FILE_NAME
    if label == "parent":
        raise ValueError(f"config field data.label='parent' labels files by their folder, but TFDS examples of {name!r}"
                         f" have none; use 'feature:<name>' (features: {list(feats.keys())}), or 'is_cat' / "
                         "'regex:<pattern>' on the example's file_name")
    if label_key not in feats:
        what = "a feature" if by_feature else "a 'file_name' feature to label by file name"
        raise ValueError(f"config field data.label={label!r} needs {what} {label_key!r}, but TFDS dataset {name!r} "
                         f"has features {list(feats.keys())}; use 'feature:<name>' with one of them")
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    if valid_pct > 0:
        parts = _split_names(str(data_cfg.tfds_split), splits, name)
        train_split = valid_split = "+".join(parts)
    else:
        if "train" not in splits:
            raise ValueError(f"TFDS dataset {name!r} has no 'train' split (splits: {sorted(splits)}); set "
                             "data.valid_pct > 0 and data.tfds_split to the splits to pool")
        train_split = "train"
        valid_split = next((s for s in VALID_SPLITS if s in splits), None)

    keys = sorted({label_key} | ({FILE_NAME} if FILE_NAME in feats and valid_pct > 0 else set()))
    class_label = by_feature and isinstance(feats[label_key], tfds.features.ClassLabel)
    need_pass = not class_label or valid_pct > 0
    where = f"TFDS {name} at {path}"
    if not need_pass:  # feature labels on the dataset's own splits: read in the graph, no pass
        classes = sorted(feats[label_key].names)
        remap = np.array([classes.index(c) for c in feats[label_key].names], np.int32)
        n_tr, n_va = splits[train_split], splits[valid_split] if valid_split else 0
        return TfdsPlan(builder, train_split, valid_split, None, None, None, None, label_key, remap, classes,
                        n_tr, n_va, f"{where}: its own splits 'train' and {valid_split!r}; labels {label}")

    def labelled(split: str) -> tuple[dict[str, np.ndarray], list[str]]:
        cols = _read_small_features(builder, split, keys)
        if by_feature:
            return cols, _class_names(cols[label_key], feats[label_key], label)
        files = [f.decode() for f in cols[FILE_NAME]]
        return cols, [lab for _, lab in sources.label_all(files, sources.name_labeller(label, "tfds"), where)]

    if valid_pct > 0:
        cols, names = labelled(train_split)
        n = len(names)
        order = np.argsort(cols[FILE_NAME].astype(str), kind="stable") if FILE_NAME in cols else np.arange(n)
        _, va = sources.random_split(n, valid_pct, seed)
        valid_mask = np.zeros(n, bool)
        valid_mask[order[va]] = True
        classes = _classes(names, feats[label_key] if by_feature else None)
        idx = np.array([classes.index(c) for c in names], np.int32)
        by = "file_name" if FILE_NAME in cols else "read order"
        how = (f"{where}: random valid_pct={valid_pct} split (fastai RandomSplitter, data.seed={seed}) of "
               f"{train_split!r} ({n} examples ordered by {by}); labels {label}")
        return TfdsPlan(builder, train_split, valid_split, ~valid_mask, valid_mask, idx, idx, label_key,
                        np.zeros(0, np.int32), classes, int((~valid_mask).sum()), int(valid_mask.sum()), how)
    _, tr_names = labelled(train_split)
    va_names = labelled(valid_split)[1] if valid_split else []
    classes = _classes(tr_names + va_names, None)
    index = {c: i for i, c in enumerate(classes)}
    to_idx = lambda ns: np.array([index[c] for c in ns], np.int32)
    return TfdsPlan(builder, train_split, valid_split, None, None, to_idx(tr_names), to_idx(va_names), label_key,
                    np.zeros(0, np.int32), classes, len(tr_names), len(va_names),
                    f"{where}: its own splits 'train' and {valid_split!r}; labels {label}")


def _classes(names: list[str], feature: Any) -> list[str]:
    """fastai's CategoryMap: sorted unique names; a ClassLabel feature keeps all its names."""
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.ClassLabel):
        return sorted(feature.names)
    return sorted(set(names))


def label_tensor(plan: TfdsPlan, valid: bool) -> tuple[tf.Tensor | None, tf.Tensor]:
    """``(labels per position or None, remap)`` as constants for the graph."""
    labels = plan.valid_labels if valid else plan.train_labels
    return (None if labels is None else tf.constant(labels, tf.int32)), tf.constant(plan.remap, tf.int32)
