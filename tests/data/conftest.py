"""Helpers that write the small image folders the data tests use (tests never need shared/ data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxtl.config import base_config


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep scan caches and demo images out of ~/.cache."""
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path_factory.mktemp("jaxtl_cache")))


def _write_image(path: Path, fmt: str = "JPEG", size: tuple[int, int] = (48, 40), mode: str = "RGB",
                seed: int = 0, frames: int = 1) -> Path:
    """A random-noise image of ``size`` (w, h) saved as ``fmt``; ``frames > 1`` writes an animated GIF."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "CMYK":
        img = img.convert("CMYK")
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames > 1:
        more = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for _ in range(frames - 1)]
        img.save(path, "GIF", save_all=True, append_images=more)
    else:
        img.save(path, fmt)
    return path


def _make_class_folder(root: Path, classes: dict[str, int], seed: int = 0, size=(48, 40)) -> list[Path]:
    """``root/<class>/<class>_<i>.jpg`` with ``classes[c]`` images each."""
    out = []
    for k, (c, n) in enumerate(sorted(classes.items())):
        for i in range(n):
            out.append(_write_image(root / c / f"{c}_{i}.jpg", size=size, seed=seed * 1000 + k * 100 + i))
    return out


def _data_config(**kw):
    """``config.data`` with small images and the given overrides."""
    d = base_config().data
    d.size = 32
    for k, v in kw.items():
        setattr(d, k, v)
    return d


@pytest.fixture
def write_image():
    return _write_image


@pytest.fixture
def make_class_folder():
    return _make_class_folder


@pytest.fixture
def data_config():
    return _data_config
