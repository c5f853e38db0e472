"""source='tfds': a tiny dataset prepared locally by a test builder (no network), and the offline error."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxtl.data import build_data
from jaxtl.data.sources import random_split

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
    px = images[:, 0, 0, 0].astype(np.float64)  # uint8 as the pipeline sends them, or normalised
    if images.dtype != np.uint8:
        px = (px * STD[0] + MEAN[0]) * 255
    return [int(v) for v in np.round(px / 10)]


def _remapped(i):
    return sorted(NAMES).index(NAMES[i % 3])


def test_tfds_train_only_uses_valid_pct_and_sorted_classes(tfds_dir, data_config):
    cfg = data_config(source="tfds", tfds_name="jaxtl_tiny_train_only", data_dir=str(tfds_dir), valid_pct=0.25,
                      tfds_split="train", label="feature:label", augment=False, flip=False)
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
    # no file_name feature: fastai's RandomSplitter over the examples in TFDS's read order
    builder = tfds.builder_from_directory(str(next(tfds_dir.glob("jaxtl_tiny_train_only/*"))))
    order = [int(e["image"][0, 0, 0]) // 10 for e in builder.as_dataset(split="train").as_numpy_iterator()]
    assert sorted(vids) == sorted(order[p] for p in random_split(12, 0.25, 42)[1])
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
    cfg = data_config(source="tfds", tfds_name="jaxtl_tiny_with_test", data_dir=str(tfds_dir), valid_pct=0.0,
                      label="feature:label", augment=False, flip=False)
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


def test_tfds_label_and_split_errors_name_the_field(tfds_dir, data_config):
    base = dict(source="tfds", tfds_name="jaxtl_tiny_with_test", data_dir=str(tfds_dir))
    with pytest.raises(ValueError, match="data.label='parent'.*feature:<name>"):
        build_data(data_config(**base), 2, 0)
    with pytest.raises(ValueError, match="needs a 'file_name' feature"):
        build_data(data_config(**base, label="is_cat"), 2, 0)
    with pytest.raises(ValueError, match="needs a feature 'colour'.*'label'"):
        build_data(data_config(**base, label="feature:colour"), 2, 0)
    with pytest.raises(ValueError, match=r"data.tfds_split='train\+validation'.*\['validation'\].*'test', 'train'"):
        build_data(data_config(**base, label="feature:label", tfds_split="train+validation"), 2, 0)
    pooled = build_data(data_config(**base, label="feature:label", valid_pct=0.2), 2, 0)  # train+test: 17 items
    assert (pooled.num_train, pooled.num_valid) == (14, 3) and "random valid_pct=0.2" in pooled.description


# ------------------------------------------------------------------- the stand-in Oxford-IIIT Pet (real features)

@pytest.fixture(scope="module")
def pets_dir(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tfds_pets import write_standin_pets

    return write_standin_pets(tmp_path_factory.mktemp("pets_tfds"))


def _pets(variant, pets_dir, **over):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pets", Path(__file__).resolve().parents[2] / "configs/pets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = mod.get_config(variant).data
    d.data_dir, d.download, d.size = str(pets_dir), False, 32
    for k, v in over.items():
        setattr(d, k, v)
    return d


def _valid_names(bundle, builder_dir):
    """File names of the validation set, read back from the TFDS records by tfds_id."""
    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(str(next(builder_dir.glob("oxford_iiit_pet/*"))))
    ds = b.as_dataset(split="train+test", read_config=tfds.ReadConfig(add_tfds_id=True),
                      decoders={"image": tfds.decode.SkipDecoding(), "segmentation_mask": tfds.decode.SkipDecoding()})
    by_id = {e["tfds_id"].decode(): e["file_name"].decode() for e in ds.as_numpy_iterator()}
    return [by_id[i] for i, _ in bundle.valid_items]


def test_pets_config_is_cats_vs_dogs_on_fastais_random_split(pets_dir):
    torch = pytest.importorskip("torch")
    b = build_data(_pets("cats", pets_dir), 4, 0)
    assert b.classes == ["False", "True"] and (b.num_train, b.num_valid) == (32, 8)
    assert "random valid_pct=0.2 split" in b.description and "'train+test'" in b.description
    names = _valid_names(b, pets_dir)
    assert [y for _, y in b.valid_items] == [int(n[0].isupper()) for n in names]  # is_cat on the file name
    # fastai: RandomSplitter(0.2, seed=42)(sorted(files)) -- torch.manual_seed(42); torch.randperm(n)[:int(.2 n)]
    files = sorted(n for split in ("train", "test") for n in _standin_files()[split])
    torch.manual_seed(42)
    fastai_valid = {files[i] for i in torch.randperm(len(files)).tolist()[:int(0.2 * len(files))]}
    assert set(names) == fastai_valid


def test_pets_breeds_variant_and_own_splits(pets_dir):
    b = build_data(_pets("breeds", pets_dir), 4, 0)
    assert b.classes == ["Abyssinian", "Bengal", "beagle", "boxer"] and (b.num_train, b.num_valid) == (32, 8)
    names = _valid_names(b, pets_dir)
    assert [b.classes[y] for _, y in b.valid_items] == [n.rsplit("_", 1)[0] for n in names]
    own = build_data(_pets("breeds", pets_dir, valid_pct=0.0), 4, 0)
    assert (own.num_train, own.num_valid) == (20, 20) and "its own splits 'train' and 'test'" in own.description
    assert sorted(_valid_names(own, pets_dir)) == sorted(_standin_files()["test"])
    species = build_data(_pets("cats", pets_dir, label="feature:species"), 4, 0)
    assert species.classes == ["Cat", "Dog"]
    assert _valid_names(species, pets_dir) == names  # the split does not depend on the label rule
    breeds37 = build_data(_pets("cats", pets_dir, label="feature:label"), 4, 0)
    assert len(breeds37.classes) == 37  # a ClassLabel keeps all its names


def _standin_files():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tfds_pets import standin_files

    return standin_files()
