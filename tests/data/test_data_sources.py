"""Labelling, splitting and the data-set sanity errors (no TF pipeline runs here except via build_data)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from jaxtl.data import DataWarning, build_data
from jaxtl.data.sources import (
    folder_split,
    list_images,
    name_func_split,
    random_split,
    resolve_tfds,
    torch_randperm,
)

PET_NAMES = ["Abyssinian_1.jpg", "Abyssinian_2.jpg", "Bengal_10.jpg", "Bengal_3.jpg",
             "great_pyrenees_173.jpg", "great_pyrenees_2.jpg", "pug_5.jpg", "pug_51.jpg", "pug_7.jpg",
             "american_pit_bull_terrier_12.jpg"]


def test_random_split_sizes_and_disjoint():
    tr, va = random_split(50, 0.2, 42)
    assert len(va) == 10 and len(tr) == 40
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(50))
    tr2, va2 = random_split(50, 0.2, 42)
    assert np.array_equal(va, va2)
    _, va3 = random_split(50, 0.2, 43)
    assert not np.array_equal(va, va3)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 100, 1000, 7349, 7390])
@pytest.mark.parametrize("seed", [0, 42, 2**31 + 7])
def test_torch_randperm_equals_torch(n, seed):
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    assert torch_randperm(n, seed).tolist() == torch.randperm(n).tolist()


def _fastai_random_splitter(valid_pct, seed):
    """fastai 2.8's RandomSplitter, transcribed (torch is the reference)."""
    import torch

    def _inner(o):
        torch.manual_seed(seed)
        rand_idx = list(torch.randperm(len(o)).numpy())
        cut = int(valid_pct * len(o))
        return rand_idx[cut:], rand_idx[:cut]
    return _inner


@pytest.mark.parametrize("n,valid_pct,seed", [(7390, 0.2, 42), (7349, 0.2, 42), (245, 0.25, 0), (30, 0.3, 7)])
def test_random_split_is_fastais_random_splitter(n, valid_pct, seed):
    pytest.importorskip("torch")
    items = [f"img_{i:05d}.jpg" for i in range(n)]
    train, valid = _fastai_random_splitter(valid_pct, seed)(items)
    tr, va = random_split(n, valid_pct, seed)
    assert va.tolist() == sorted(valid) and tr.tolist() == sorted(train)


def test_folder_split_validation_files_are_fastais(tmp_path, write_image):
    """The same sorted file list gives the same validation files as fastai's RandomSplitter(0.2, seed=42)."""
    pytest.importorskip("torch")
    names = [f"{c}/{c}_{i}.png" for c in ("cats", "dogs") for i in range(12)]
    for n in names:
        write_image(tmp_path / n, fmt="PNG", size=(8, 8))
    s = folder_split(tmp_path, valid_pct=0.2, seed=42)
    files = sorted(str(tmp_path / n) for n in names)
    _, valid = _fastai_random_splitter(0.2, 42)(files)
    assert sorted(p for p, _ in s.valid) == sorted(files[i] for i in valid)


def test_split_independent_of_creation_order(tmp_path, write_image):
    names = [f"{c}/{c}_{i}.png" for c in ("cats", "dogs") for i in range(15)]
    for k, order in enumerate([names, list(reversed(names)), random.Random(3).sample(names, len(names))]):
        for n in order:
            write_image(tmp_path / f"copy{k}" / n, fmt="PNG", size=(8, 8))
    splits = [folder_split(tmp_path / f"copy{k}", valid_pct=0.3, seed=7) for k in range(3)]
    rel = lambda items, k: sorted((str(Path(p).relative_to(tmp_path / f"copy{k}")), y) for p, y in items)
    for k in (1, 2):
        assert rel(splits[k].valid, k) == rel(splits[0].valid, 0)
        assert rel(splits[k].train, k) == rel(splits[0].train, 0)
    assert len(splits[0].valid) == int(0.3 * 30)
    other = folder_split(tmp_path / "copy0", valid_pct=0.3, seed=8)
    assert rel(other.valid, 0) != rel(splits[0].valid, 0)


def test_parent_labels_and_explicit_val_folder(tmp_path, make_class_folder):
    make_class_folder(tmp_path / "train", {"ants": 3, "bees": 4})
    make_class_folder(tmp_path / "val", {"ants": 2, "bees": 1})
    (tmp_path / "train" / "ants" / "notes.txt").write_text("not an image")
    s = folder_split(tmp_path, valid_pct=0.5)
    assert len(s.train) == 7 and len(s.valid) == 3  # explicit folders win over valid_pct; .txt ignored
    assert {y for p, y in s.train if "/ants/" in p} == {"ants"}
    assert sorted(y for _, y in s.valid) == ["ants", "ants", "bees"]
    assert "val/" in s.how


def test_train_folder_without_valid_is_split(tmp_path, make_class_folder):
    make_class_folder(tmp_path / "train", {"a": 10, "b": 10})
    make_class_folder(tmp_path / "test", {"unlabelled": 5})
    s = folder_split(tmp_path, valid_pct=0.25, seed=1)
    assert len(s.train) + len(s.valid) == 20 and len(s.valid) == 5
    assert {y for _, y in s.train + s.valid} == {"a", "b"}


def test_is_cat_and_regex_labels(tmp_path, write_image):
    for n in PET_NAMES:
        write_image(tmp_path / "images" / n, size=(8, 8))
    s = name_func_split(tmp_path / "images", "is_cat", valid_pct=0.0)
    got = {Path(p).name: y for p, y in s.train}
    assert got["Abyssinian_1.jpg"] == "True" and got["pug_5.jpg"] == "False"
    assert sum(y == "True" for y in got.values()) == 4
    s = name_func_split(tmp_path / "images", r"regex:^(.+)_\d+\.jpg$", valid_pct=0.0)
    got = {Path(p).name: y for p, y in s.train}
    assert got["great_pyrenees_173.jpg"] == "great_pyrenees"
    assert got["american_pit_bull_terrier_12.jpg"] == "american_pit_bull_terrier"
    assert {y for y in got.values()} == {"Abyssinian", "Bengal", "great_pyrenees", "pug",
                                         "american_pit_bull_terrier"}


def test_label_func_callable_and_file_list(tmp_path, write_image):
    for n in PET_NAMES:
        write_image(tmp_path / n, size=(8, 8))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(PET_NAMES[:6]) + "\n")
    s = name_func_split(lst, "parent", valid_pct=0.0, label_func=lambda name: name.split("_")[0].lower())
    assert sorted({y for _, y in s.train}) == ["abyssinian", "bengal", "great"]
    assert len(s.train) == 6
    s = name_func_split(None, "is_cat", valid_pct=0.0, files=[tmp_path / n for n in PET_NAMES[5:]])
    assert len(s.train) == 5


def test_regex_that_does_not_match_names_the_file(tmp_path, write_image):
    write_image(tmp_path / "cat_1.jpg", size=(8, 8))
    write_image(tmp_path / "weird-name.jpg", size=(8, 8))
    with pytest.raises(ValueError, match="weird-name.jpg"):
        name_func_split(tmp_path, r"regex:^(.+)_\d+\.jpg$")
    with pytest.raises(ValueError, match="group"):
        name_func_split(tmp_path, r"regex:^.+\.jpg$")
    with pytest.raises(ValueError, match="name_func"):
        name_func_split(tmp_path, "parent")


def test_list_images_sorted_recursive_case_insensitive(tmp_path, write_image):
    write_image(tmp_path / "b" / "X.JPG", size=(8, 8))
    write_image(tmp_path / "a" / "y z.png", fmt="PNG", size=(8, 8))
    write_image(tmp_path / ".hidden" / "h.jpg", size=(8, 8))
    (tmp_path / "a" / "readme.md").write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a/y z.png", "b/X.JPG"]


def test_empty_folder_and_single_class_errors(tmp_path, data_config, make_class_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files.*empty"):
        build_data(data_config(path=str(tmp_path / "empty")), 2, 0)
    make_class_folder(tmp_path / "one", {"ants": 6})
    with pytest.raises(ValueError, match=r"only one class \('ants'\).*one"):
        build_data(data_config(path=str(tmp_path / "one")), 2, 0)
    with pytest.raises(FileNotFoundError, match="missing"):
        build_data(data_config(path=str(tmp_path / "missing")), 2, 0)


def test_class_only_in_validation_warns(tmp_path, data_config, make_class_folder):
    make_class_folder(tmp_path / "train", {"a": 4, "b": 4})
    make_class_folder(tmp_path / "valid", {"a": 1, "b": 1, "c": 2})
    with pytest.warns(DataWarning, match=r"\['c'\].*only in the validation set"):
        b = build_data(data_config(path=str(tmp_path)), 2, 0)
    assert b.classes == ["a", "b", "c"]
    assert b.num_valid == 4


def test_batch_larger_than_train_set_errors(tmp_path, data_config, make_class_folder):
    make_class_folder(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(ValueError, match="batch_size"):
        build_data(data_config(path=str(tmp_path), valid_pct=0.5), 8, 0)


def test_tfds_missing_dataset_fails_fast_with_instructions(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        resolve_tfds("oxford_iiit_pet", str(tmp_path))
    msg = str(e.value)
    assert "tfds build oxford_iiit_pet" in msg and str(tmp_path) in msg and "manual" in msg
    with pytest.raises(ValueError, match="tfds_name"):
        resolve_tfds("not a name!", str(tmp_path))


def test_package_exports_every_name_it_lists():
    import jaxtl.data

    missing = [n for n in jaxtl.data.__all__ if not hasattr(jaxtl.data, n)]
    assert not missing
