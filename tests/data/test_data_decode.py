"""Decoding of mixed formats and the corrupt-file scan (report, skip, error, cache)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from jaxtl.data import DataWarning, build_data, decode, scan_images


def _pil_rgb(path):
    with Image.open(path) as im:
        im.seek(0)
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("fmt,mode,name", [
    ("JPEG", "RGB", "a.jpg"), ("JPEG", "L", "gray.jpeg"), ("JPEG", "CMYK", "cmyk.jpg"),
    ("PNG", "RGBA", "alpha.png"), ("PNG", "L", "gray.png"), ("BMP", "RGB", "b.bmp"), ("GIF", "RGB", "anim.gif"),
    ("PNG", "RGB", "png disguised as.jpg"),
])
def test_decode_formats_to_rgb(tmp_path, write_image, fmt, mode, name):
    p = write_image(tmp_path / name, fmt=fmt, mode=mode, size=(30, 20), frames=3 if fmt == "GIF" else 1)
    img = decode.decode_rgb(tf.io.read_file(str(p))).numpy()
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    ref = _pil_rgb(p)  # GIF: PIL's first frame; CMYK: both apply the inverted-CMYK -> RGB conversion
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < (3.0 if fmt == "JPEG" else 1.0)


def test_decode_crop_matches_full_decode(tmp_path, write_image):
    for name, fmt, mode in (("c.jpg", "JPEG", "RGB"), ("cmyk.jpg", "JPEG", "CMYK"), ("g.jpg", "JPEG", "L"),
                            ("c.png", "PNG", "RGBA")):
        p = write_image(tmp_path / name, fmt=fmt, mode=mode, size=(40, 30))
        data = tf.io.read_file(str(p))
        box = lambda h, w: tf.constant([5, 7, 12, 20])
        crop = decode.decode_crop(data, box).numpy()
        full = decode.decode_rgb(data).numpy()
        assert crop.shape == (12, 20, 3)
        # libjpeg may decode a window with slightly different upsampling at the edges
        assert np.abs(crop.astype(int) - full[5:17, 7:27].astype(int)).mean() < 2.0


def _corrupt_folder(root, write_image):
    for c in ("cats", "dogs"):
        for i in range(4):
            write_image(root / c / f"{c} {i}.jpg", size=(24, 24), seed=i)
    (root / "cats" / "empty.jpg").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 90).save(good, "JPEG")
    (root / "dogs" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "dogs" / "page.jpg").write_text("<html><body>404 not found</body></html>")
    write_image(root / "dogs" / "ok.gif", fmt="GIF", size=(24, 24), frames=2)
    return {str(root / "cats" / "empty.jpg"), str(root / "dogs" / "truncated.jpg"), str(root / "dogs" / "page.jpg")}


def test_scan_reports_corrupt_files_and_caches(tmp_path, write_image, monkeypatch):
    bad = _corrupt_folder(tmp_path / "d", write_image)
    paths = sorted(str(p) for p in (tmp_path / "d").rglob("*") if p.is_file())
    report = scan_images(paths, str(tmp_path / "d"), cache_dir=tmp_path / "cache")
    assert set(report) == bad
    assert "empty" in report[str(tmp_path / "d" / "cats" / "empty.jpg")]
    assert report[str(tmp_path / "d" / "dogs" / "page.jpg")].startswith("Unknown image file format")
    assert report[str(tmp_path / "d" / "dogs" / "truncated.jpg")].startswith("jpeg::Uncompress failed")

    def no_decode(*a, **k):
        raise AssertionError("second scan should come from the cache")

    monkeypatch.setattr(decode, "_decode_errors", no_decode)
    assert scan_images(paths, str(tmp_path / "d"), cache_dir=tmp_path / "cache") == report
    # a changed file is decoded again
    monkeypatch.undo()
    write_image(tmp_path / "d" / "dogs" / "page.jpg", size=(24, 24))
    report2 = scan_images(paths, str(tmp_path / "d"), cache_dir=tmp_path / "cache")
    assert set(report2) == bad - {str(tmp_path / "d" / "dogs" / "page.jpg")}


def test_build_skips_corrupt_with_warning_or_errors(tmp_path, write_image, data_config):
    bad = _corrupt_folder(tmp_path / "d", write_image)
    cfg = data_config(path=str(tmp_path / "d"), valid_pct=0.25)
    with pytest.warns(DataWarning, match="skipping 3 unreadable") as rec:
        b = build_data(cfg, 2, 0)
    msg = str(rec[0].message)
    assert all(p in msg for p in bad)
    assert set(b.corrupt) == bad
    assert b.num_train + b.num_valid == 9
    items = [p for p, _ in b.valid_items]
    assert not set(items) & bad
    n = sum(int(batch["mask"].sum()) for batch in b.valid_batches())
    n += sum(len(batch["label"]) for batch in b.train_batches(0))
    assert n == b.num_valid + b.steps_per_epoch * 2  # and nothing crashed while decoding
    cfg.on_corrupt = "error"
    with pytest.raises(ValueError, match="(?s)3 unreadable image file.*on_corrupt=skip"):
        build_data(cfg, 2, 0)
