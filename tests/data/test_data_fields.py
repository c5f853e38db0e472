"""Every ``data.*`` field has an effect for each source that reads it, and is reported when set for one that
doesn't (``jaxtl.config.DATA_FIELD_SOURCES`` / ``ignored_fields``).

For each field, each source builds the pipeline with the field at its default and at another valid value and
compares what the run would get: classes, split sizes and description, parallelism and caching, the validation
items, the first training batch and the first validation batch (or the error, where the other value makes the
data unusable, e.g. ``on_corrupt='error'`` over a corrupt file).
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxtl.config import DATA_FIELD_SOURCES, base_config, field_paths, ignored_fields
from jaxtl.data import build_data, make_demo_folder
from jaxtl.data.sources import SOURCES

# another valid value per field; a dict gives one per source
OTHER = {
    "path": {"folder": "other_folder", "name_func": "other_pets"},
    "label": {"folder": r"regex:_(\d)", "name_func": r"regex:^(.+)_\d+\.jpg$", "tfds": "feature:species"},
    "valid_pct": 0.4, "seed": 7, "size": 40, "min_scale": 0.9, "augment": False, "flip": False,
    "max_rotate": 30.0, "min_zoom": 0.8, "max_zoom": 1.5, "max_warp": 0.4, "max_lighting": 0.6, "p_affine": 0.0,
    "p_lighting": 0.0, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "on_corrupt": "error",
    "tfds_name": "jaxtl_no_such_dataset", "data_dir": "empty_dir", "download": False, "tfds_split": "train",
    "num_workers": 1, "shuffle_buffer": 1, "cache": True, "demo_images": 8, "demo_classes": 3,
    "augment_device": "host", "size_schedule": ((0, 24), (1, 32)),  # the base size is 32
}
NOT_WALKED = {"source": "it chooses the source; every other field is walked under each source"}
# fields whose effect shows only in a particular state: both builds use these extra settings
SETUP = {"download": {"tfds": {"tfds_name": "jaxtl_missing", "download": True}}}


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), np.uint8)).save(path, "JPEG")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("fields")
    for folder in ("folder", "other_folder"):
        for k, c in enumerate(("cats", "dogs")):
            for i in range(6):
                _jpeg(root / folder / c / f"{c}_{i}.jpg", 100 * k + i + len(folder))
        (root / folder / "cats" / "cats_9.jpg").write_bytes(b"not a jpeg")
    for folder in ("pets", "other_pets"):
        for k, breed in enumerate(("Bengal", "Persian", "beagle", "pug")):
            for i in range(1, 4):
                _jpeg(root / folder / f"{breed}_{i + len(folder)}.jpg", 10 * k + i)
        (root / folder / "Bengal_99.jpg").write_bytes(b"")
    demo = make_demo_folder(2, 6, cache_dir=root / "cache")
    (demo / "circle" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    (root / "empty_dir").mkdir()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tfds_pets import write_standin_pets

    write_standin_pets(root / "tfds")
    return root


def _config(source: str, root: Path, **over):
    d = base_config().data
    d.source, d.size, d.valid_pct = source, 32, 0.25
    if source == "folder":
        d.path = str(root / "folder")
    elif source == "name_func":
        d.path, d.label = str(root / "pets"), "is_cat"
    elif source == "tfds":
        d.data_dir, d.label, d.download = str(root / "tfds"), "is_cat", False
    else:
        d.demo_images = 6
    for k, v in over.items():
        setattr(d, k, str(root / v) if k in ("path", "data_dir") else v)
    return d


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _what_the_run_gets(cfg, root: Path) -> tuple:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = build_data(cfg, 4, 0, cache_dir=str(root / "cache"))
            train = next(iter(b.train_batches(0)))
            valid = next(iter(b.valid_batches()))
    except (ValueError, FileNotFoundError) as e:
        return ("error", type(e).__name__, str(e).split("\n")[0])
    from jaxtl.device_augment import BatchTransform

    # the images and the batch transforms' draws the host sends, and the transform the steps apply on the device
    return (tuple(b.classes), b.num_train, b.num_valid, b.description, b.num_parallel, b._source.cache,
            tuple(b.valid_items), tuple(_digest(train[k]) for k in sorted(train)), _digest(valid["image"]),
            BatchTransform.for_data(b))


def _fields() -> list[str]:
    return [f.split(".", 1)[1] for f in field_paths(base_config()) if f.startswith("data.")]


def test_every_data_field_has_another_value_or_a_reason():
    assert set(OTHER) | set(NOT_WALKED) == set(_fields()) and not set(OTHER) & set(NOT_WALKED)
    assert set(DATA_FIELD_SOURCES) <= set(_fields())
    assert all(set(v) <= set(SOURCES) for v in DATA_FIELD_SOURCES.values())


@pytest.mark.slow
@pytest.mark.parametrize("field", sorted(OTHER))
def test_data_field_changes_the_pipeline_or_is_reported(field, roots):
    for source in SOURCES:
        used = source in DATA_FIELD_SOURCES.get(field, SOURCES)
        other = OTHER[field][source] if isinstance(OTHER[field], dict) and used else OTHER[field]
        if isinstance(other, dict):  # a per-source value, and this source ignores the field: any of them
            other = next(iter(other.values()))
        setup = SETUP.get(field, {}).get(source, {})
        default = _config(source, roots, **setup)
        changed = _config(source, roots, **{**setup, field: other})
        before, after = _what_the_run_gets(default, roots), _what_the_run_gets(changed, roots)
        reported = [m for m in ignored_fields(changed) if f"data.{field}=" in m]
        if used:
            assert after != before, f"data.{field}={other!r} changed nothing for data.source={source!r}"
            assert not reported
        else:
            assert after == before, f"data.{field} is said to be ignored by {source!r} but changed the pipeline"
            assert reported and source in reported[0], f"data.{field} set for {source!r} is not reported"


def test_ignored_field_is_a_data_warning(roots):
    from jaxtl.config import validate
    from jaxtl.data import DataWarning

    c = base_config()
    c.data = _config("demo", roots, tfds_name="imagenet2012")  # validated once, when a run loads its config
    with pytest.warns(DataWarning, match=r"data.tfds_name='imagenet2012' is ignored: data.source='demo'.*tfds"):
        validate(c)
