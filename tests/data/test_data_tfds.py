"""source='tfds': a tiny dataset prepared locally by a test builder (no network), and the offline error."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxtl.data import build_data

NAMES = ["zebra", "Apple", "mango"]  # deliberately unsorted: jaxtl's classes are sorted
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _features():
    return tfds.features.FeaturesDict({"image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=NAMES)})


def _examples(start, n):
    for i in range(start, start + n):  # item i: solid grey level 10*i, label i % 3
        yield i, {"image": np.full((20 + i % 4, 24, 3), 10 * i, np.uint8), "label": i % 3}


with tfds.core.registered.skip_registration():
    class JaxtlTinyTrainOnly(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=_features())

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 12)}

        def _generate_examples(self, start, n):
            yield from _examples(start, n)

    class JaxtlTinyWithTest(JaxtlTinyTrainOnly):
        VERSION = tfds.core.Version("2.0.0")

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 12), "test": self._generate_examples(12, 5)}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    for cls in (JaxtlTinyTrainOnly, JaxtlTinyWithTest):
        cls(data_dir=str(d)).download_and_prepare()
    return d


def _ids(images):
    return [int(v) for v in np.round((images[:, 0, 0, 0] * STD[0] + MEAN[0]) * 255 / 10)]


def _remapped(i):
    return sorted(NAMES).index(NAMES[i % 3])


def test_tfds_train_only_uses_valid_pct_and_sorted_classes(tfds_dir, data_config):
    cfg = data_config(source="tfds", tfds_name="jaxtl_tiny_train_only", data_dir=str(tfds_dir), valid_pct=0.25,
                      augment=False, flip=False)
    b = build_data(cfg, 3, 0)
    assert b.classes == ["Apple", "mango", "zebra"]
    assert (b.num_train, b.num_valid, b.steps_per_epoch) == (9, 3, 3)
    vb = list(b.valid_batches())
    mask = np.concatenate([v["mask"] for v in vb])
    imgs = np.concatenate([v["image"] for v in vb])[mask]
    labels = np.concatenate([v["label"] for v in vb])[mask]
    vids = _ids(imgs)
    assert len(vids) == 3 and labels.tolist() == [_remapped(i) for i in vids]
    assert [y for _, y in b.valid_items] == labels.tolist()
    assert all("jaxtl_tiny_train_only" in i for i, _ in b.valid_items)
    train_ids, train_labels = [], []
    for bt in b.train_batches(0):
        assert bt["image"].shape == (3, 32, 32, 3) and bt["label"].dtype == np.int32
        train_ids += _ids(bt["image"])
        train_labels += bt["label"].tolist()
    assert sorted(train_ids + vids) == list(range(12))  # disjoint split, every item once
    assert train_labels == [_remapped(i) for i in train_ids]
    full = list(b.train_batches(4))
    rest = list(b.train_batches(4, start_step=1))
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(full[1:], rest, strict=True))


def test_tfds_test_split_is_validation_and_process_shards(tfds_dir, data_config):
    cfg = data_config(source="tfds", tfds_name="jaxtl_tiny_with_test", data_dir=str(tfds_dir),
                      augment=False, flip=False)
    b = build_data(cfg, 2, 0)
    assert (b.num_train, b.num_valid) == (12, 5)
    parts = [build_data(cfg, 2, 0, process_index=i, process_count=2) for i in range(2)]
    assert [p.steps_per_epoch for p in parts] == [3, 3] and [p.valid_steps for p in parts] == [2, 2]
    seen_train, seen_valid = [], []
    for p in parts:
        ids = [i for bt in p.train_batches(0) for i in _ids(bt["image"])]
        assert len(ids) == 6
        seen_train.append(set(ids))
        vb = list(p.valid_batches())
        mask = np.concatenate([v["mask"] for v in vb])
        seen_valid += _ids(np.concatenate([v["image"] for v in vb])[mask])
    assert not seen_train[0] & seen_train[1] and seen_train[0] | seen_train[1] == set(range(12))
    assert sorted(seen_valid) == list(range(12, 17))


def test_tfds_missing_dataset_fails_fast_offline(tmp_path, data_config):
    cfg = data_config(source="tfds", tfds_name="oxford_iiit_pet", data_dir=str(tmp_path))
    t = time.time()
    with pytest.raises(FileNotFoundError) as e:
        build_data(cfg, 8, 0)
    assert time.time() - t < 30
    msg = str(e.value)
    assert "not prepared" in msg and "tfds build oxford_iiit_pet" in msg and str(tmp_path) in msg
    assert "downloads/manual" in msg
