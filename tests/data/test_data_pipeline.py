"""The DataBundle contract: shapes, determinism, exact resume, validation coverage, per-process shards."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxtl.data import build_data, make_demo_folder, show_batch
from jaxtl.device_augment import BatchTransform

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture
def mixed_folder(tmp_path, write_image):
    """train/{ants,bees} with JPEG, PNG, GIF, BMP, grayscale and a name with a space; valid/ with 5 images."""
    root = tmp_path / "hym"
    fmts = [("JPEG", "RGB", "jpg"), ("PNG", "RGBA", "png"), ("GIF", "RGB", "gif"), ("BMP", "L", "bmp"),
            ("JPEG", "L", "jpeg")]
    for k, c in enumerate(("ants", "bees")):
        for i in range(9):
            fmt, mode, ext = fmts[i % len(fmts)]
            name = f"{c} photo {i}.{ext}" if i == 0 else f"{c}_{i}.{ext}"
            write_image(root / "train" / c / name, fmt=fmt, mode=mode, size=(40 + 3 * i, 30 + 2 * k),
                        seed=10 * k + i, frames=2 if fmt == "GIF" else 1)
    for i in range(5):
        write_image(root / "valid" / ("ants" if i < 3 else "bees") / f"v{i}.jpg", size=(36, 44), seed=100 + i)
    return root


def colour_folder(root, n_per_class=10, classes=("a", "b")):
    """Solid-colour PNGs whose colour encodes a unique item id (recoverable after crop/resize)."""
    ids = {}
    k = 0
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            colour = (k * 5 % 256, k * 5 // 256 * 40, 200)
            Image.fromarray(np.full((20 + i, 24, 3), colour, np.uint8)).save(root / c / f"{c}_{i}.png")
            ids[colour[:2]] = k
            k += 1
    return ids


def item_ids(images, ids):
    """Recover item ids from solid-colour batch images (uint8 as the pipeline sends them, or normalised)."""
    px = images[:, 0, 0, :].astype(int) if images.dtype == np.uint8 else \
        np.round((images[:, 0, 0, :] * STD + MEAN) * 255).astype(int)
    return [ids[(int(r), int(g))] for r, g, _ in px]


def test_shapes_dtypes_ranges(mixed_folder, data_config):
    b = build_data(data_config(path=str(mixed_folder), augment_device="device"), 4, 0)
    assert b.classes == ["ants", "bees"] and b.on_device
    assert (b.num_train, b.num_valid, b.steps_per_epoch, b.valid_steps) == (18, 5, 4, 2)
    batches = list(b.train_batches(0))
    assert len(batches) == 4
    for batch in batches:  # uint8 images + the batch transforms' draws (applied on the device)
        assert set(batch) == {"image", "label", "affine", "flip", "lighting"}
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert batch["affine"].shape == (4, 8) and batch["affine"].dtype == np.float32
        assert batch["flip"].shape == (4,) and batch["flip"].dtype == np.bool_
        assert batch["lighting"].shape == (4, 2) and batch["lighting"].dtype == np.float32
    x = np.concatenate([bt["image"] for bt in batches])
    assert x.std() > 0.3 * 255 * STD.min()  # real pixels, not padding
    labels = np.concatenate([bt["label"] for bt in batches])
    assert set(labels) == {0, 1}
    d = b.denormalize(x)
    assert d.min() >= 0 and d.max() <= 1 and d.dtype == np.float32
    host = build_data(data_config(path=str(mixed_folder), augment_device="host"), 4, 0)
    assert not host.on_device
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for batch in host.train_batches(0):  # augmented and normalised float32
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
        assert (batch["image"] >= lo - 1e-5).all() and (batch["image"] <= hi + 1e-5).all()
    assert next(host.valid_batches())["image"].dtype == np.float32
    d = host.denormalize(batch["image"])
    assert d.min() >= 0 and d.max() <= 1 and d.dtype == np.float32


def test_validation_every_image_once_in_order(mixed_folder, data_config):
    b = build_data(data_config(path=str(mixed_folder)), 4, 0)
    vb = list(b.valid_batches())
    assert len(vb) == 2
    assert all(set(v) == {"image", "label", "mask"} and v["mask"].dtype == np.bool_ for v in vb)
    mask = np.concatenate([v["mask"] for v in vb])
    assert mask.tolist() == [True] * 5 + [False] * 3
    imgs = np.concatenate([v["image"] for v in vb])[mask]
    labels = np.concatenate([v["label"] for v in vb])[mask]
    items = b.valid_items
    assert [y for _, y in items] == labels.tolist() == [0, 0, 0, 1, 1]
    normalised = np.asarray(BatchTransform.for_data(b).eval(imgs))  # what the eval step feeds the model
    for img, (path, _) in zip(normalised, items, strict=True):
        np.testing.assert_allclose(img, b.preprocess_eval(path), atol=1e-5)
        with open(path, "rb") as f:
            np.testing.assert_allclose(img, b.preprocess_eval(f.read()), atol=1e-5)
    assert list(b.valid_batches())[0]["image"].tobytes() == vb[0]["image"].tobytes()  # repeatable


def test_preprocess_eval_inputs_and_errors(mixed_folder, data_config, tmp_path):
    b = build_data(data_config(path=str(mixed_folder)), 4, 0)
    png = mixed_folder / "train" / "ants" / "ants_1.png"  # lossless, so PIL and TF decode the same pixels
    arr = np.asarray(Image.open(png).convert("RGB"))
    out = b.preprocess_eval(arr)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, b.preprocess_eval(png), atol=1e-5)
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        b.preprocess_eval(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        b.preprocess_eval(tmp_path / "nope.jpg")


def test_same_seed_same_batches_and_epochs_differ(mixed_folder, data_config):
    cfg = data_config(path=str(mixed_folder))
    a, b = build_data(cfg, 4, 7), build_data(cfg, 4, 7)
    ea, eb = list(a.train_batches(1)), list(b.train_batches(1))
    for x, y in zip(ea, eb, strict=True):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    e2 = list(a.train_batches(2))
    assert not np.array_equal(ea[0]["image"], e2[0]["image"])
    other_seed = list(build_data(cfg, 4, 8).train_batches(1))
    assert not np.array_equal(ea[0]["image"], other_seed[0]["image"])


@pytest.mark.parametrize("cache", [False, True])
def test_resume_with_start_step_gives_the_remaining_batches(mixed_folder, data_config, cache):
    b = build_data(data_config(path=str(mixed_folder), cache=cache), 4, 3)
    full = list(b.train_batches(5))
    for start in (1, 3, 4):
        rest = list(b.train_batches(5, start_step=start))
        assert len(rest) == len(full) - start
        for x, y in zip(full[start:], rest, strict=True):
            assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    with pytest.raises(ValueError, match="start_step"):
        b.train_batches(0, start_step=5)


def same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("cache", [False, True])
def test_one_pipeline_serves_the_whole_run_and_any_position_gives_the_same_batches(tmp_path, data_config, cache):
    ids = colour_folder(tmp_path / "c", n_per_class=9)  # 18 items -> 4 batches of 4 per epoch
    cfg = data_config(path=str(tmp_path / "c"), valid_pct=0.0, cache=cache)
    run = build_data(cfg, 4, 11)
    epochs = [list(run.train_batches(e)) for e in range(3)]  # as the loop asks: epoch after epoch
    assert run.pipelines_built == 1  # not rebuilt per epoch
    first = [i for bt in epochs[0] for i in item_ids(bt["image"], ids)]
    assert len(set(first)) == 16
    fresh = build_data(cfg, 4, 11)  # out of order: a pipeline at epoch 2, one at 0 that goes on into 1
    for e in (2, 0, 1):
        same_batches(list(fresh.train_batches(e)), epochs[e])
    assert fresh.pipelines_built == 2
    # an abandoned epoch (show_batch takes one batch) and a resume mid-epoch start a pipeline there
    resumed = build_data(cfg, 4, 11)
    same_batches([next(resumed.train_batches(1))], epochs[1][:1])
    same_batches(list(resumed.train_batches(1, start_step=2)) + list(resumed.train_batches(2)),
                 epochs[1][2:] + epochs[2])
    assert resumed.pipelines_built == 2
    if cache:  # the decoded shard is kept across epochs and pipelines: the files are read once
        for f in (tmp_path / "c").rglob("*.png"):
            f.unlink()
        assert len(list(run.train_batches(3))) == 4
        same_batches(list(run.train_batches(1)), epochs[1])  # a new pipeline, from the same cache
        assert run.pipelines_built == 2


@pytest.mark.parametrize("cache", [False, True])
def test_epoch_is_a_permutation_and_process_shards_are_disjoint(tmp_path, data_config, cache):
    ids = colour_folder(tmp_path / "c", n_per_class=11)  # 22 items
    cfg = data_config(path=str(tmp_path / "c"), valid_pct=0.0, augment=False, flip=False, cache=cache)
    single = build_data(cfg, 4, 0)
    assert single.steps_per_epoch == 5
    assert single.num_valid == 0 and single.valid_steps == 0 and list(single.valid_batches()) == []
    seen = [i for bt in single.train_batches(0) for i in item_ids(bt["image"], ids)]
    assert len(seen) == 20 and len(set(seen)) == 20  # each item at most once per epoch
    seen1 = [i for bt in single.train_batches(1) for i in item_ids(bt["image"], ids)]
    assert seen1 != seen

    p0, p1 = (build_data(cfg, 4, 0, process_index=i, process_count=2) for i in range(2))
    assert p0.steps_per_epoch == p1.steps_per_epoch == 2  # 11 per process -> 2 batches of 4
    for epoch in range(2):
        s0 = [i for bt in p0.train_batches(epoch) for i in item_ids(bt["image"], ids)]
        s1 = [i for bt in p1.train_batches(epoch) for i in item_ids(bt["image"], ids)]
        assert len(s0) == len(s1) == 8 and len(set(s0)) == 8 and not set(s0) & set(s1)
        if not cache:  # the permutation is re-dealt every epoch: over epochs, every item gets its turn
            assert set(s0) | set(s1) <= set(range(22))
    if cache:  # fixed shards: interleaved halves of the sorted items
        all0 = {i for e in range(4) for bt in p0.train_batches(e) for i in item_ids(bt["image"], ids)}
        all1 = {i for e in range(4) for bt in p1.train_batches(e) for i in item_ids(bt["image"], ids)}
        assert not all0 & all1


def test_validation_shards_cover_everything_once(tmp_path, data_config):
    ids = colour_folder(tmp_path / "c", n_per_class=7)  # 14 items, 5 valid with valid_pct=0.4
    cfg = data_config(path=str(tmp_path / "c"), valid_pct=0.4)
    whole = build_data(cfg, 2, 0)
    assert whole.num_valid == 5
    parts = [build_data(cfg, 2, 0, process_index=i, process_count=2) for i in range(2)]
    assert [p.valid_steps for p in parts] == [2, 2]  # ceil(ceil(5/2)/2) on both
    got = []
    for p in parts:
        vb = list(p.valid_batches())
        assert len(vb) == p.valid_steps
        mask = np.concatenate([v["mask"] for v in vb])
        imgs = np.concatenate([v["image"] for v in vb])[mask]
        assert mask.sum() == len(p.valid_items)
        got += item_ids(imgs, ids)
    assert sorted(got) == sorted(item_ids(np.concatenate([v["image"] for v in whole.valid_batches()])[:5], ids))
    assert sorted(parts[0].valid_items + parts[1].valid_items) == sorted(whole.valid_items)


def test_show_batch_writes_png(mixed_folder, data_config, tmp_path):
    b = build_data(data_config(path=str(mixed_folder)), 4, 0)
    out = show_batch(b, tmp_path / "plots" / "batch.png", n=6)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_demo_source_is_deterministic_and_loads(tmp_path, data_config, monkeypatch):
    r1 = make_demo_folder(3, 6, cache_dir=tmp_path / "c1")
    r2 = make_demo_folder(3, 6, cache_dir=tmp_path / "c2")
    files = sorted(p.relative_to(r1) for p in r1.rglob("*.jpg"))
    assert len(files) == 18 and files == sorted(p.relative_to(r2) for p in r2.rglob("*.jpg"))
    assert all((r1 / f).read_bytes() == (r2 / f).read_bytes() for f in files)
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "c1"))
    b = build_data(data_config(source="demo", demo_classes=3, demo_images=6, valid_pct=0.25), 4, 0)
    assert b.classes == ["circle", "square", "triangle"]
    assert b.num_train + b.num_valid == 18 and b.num_valid == 4
    assert next(b.train_batches(0))["image"].shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match="demo_classes"):
        make_demo_folder(11, 4, cache_dir=tmp_path / "c3")


@pytest.mark.parametrize("aug", [{}, {"max_warp": 0.0, "max_rotate": 0.0, "max_zoom": 1.0}, {"augment": False}])
def test_the_batch_transforms_on_the_device_equal_them_on_the_host(mixed_folder, data_config, aug):
    """``data.augment_device``: what the train / eval steps compute from a device-mode batch (uint8 + the draws,
    ``BatchTransform``) equals the host-mode pipeline's batch of the same epoch and seed (augmented and normalised
    by TF on the host). float32 rounding of the two implementations: atol 2e-5 after the division by std (the
    per-op comparison is in tests/test_device_augment.py). Default fastai augmentation, flip only, none."""
    dev = build_data(data_config(path=str(mixed_folder), augment_device="device", **aug), 4, 7)
    host = build_data(data_config(path=str(mixed_folder), augment_device="host", **aug), 4, 7)
    transform = BatchTransform.for_data(dev)
    n = 0
    for d, h in zip(dev.train_batches(2), host.train_batches(2), strict=True):
        assert d["image"].dtype == np.uint8 and h["image"].dtype == np.float32
        np.testing.assert_array_equal(d["label"], h["label"])
        np.testing.assert_allclose(np.asarray(transform.train(d)), h["image"], atol=2e-5, rtol=0)
        if not aug:
            assert not np.allclose(np.asarray(transform.eval(d["image"])), h["image"], atol=1e-2)  # augmented
        n += 1
    assert n == dev.steps_per_epoch
    for d, h in zip(dev.valid_batches(), host.valid_batches(), strict=True):
        np.testing.assert_allclose(np.asarray(transform.eval(d["image"])), h["image"], atol=2e-5, rtol=0)
        np.testing.assert_array_equal(d["mask"], h["mask"])
