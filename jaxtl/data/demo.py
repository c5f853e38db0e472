"""A small synthetic image-classification set (``data.source='demo'``) written as real JPEG files.

Class ``k`` of ``n`` is a filled shape (circle, square, triangle, ...) in its own hue (``k / n`` of the
colour wheel), at a random position, size and rotation, on a random two-colour gradient background with
pixel noise; image sides vary in 96..144 px so the crops and resizes do real work. Everything is drawn from
``numpy.random.default_rng([k, i, version])``: the files are the same on every machine. They go to
``<cache_dir>/demo/v2_<classes>x<images>/<class>/<class>_<i>.jpg`` once (written to a temporary folder, then
renamed, so concurrent processes never see half a dataset) and are then read through the ``folder`` source
like any image folder.
"""

from __future__ import annotations

import colorsys
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jaxtl.data.decode import default_cache_dir

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "stripes", "dots", "hexagon")
DEMO_VERSION = 2


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple]:
    pts = []
    steps = 2 * n if inner is not None else n
    for j in range(steps):
        rad = r if inner is None or j % 2 == 0 else r * inner
        a = rot + 2 * math.pi * j / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_demo_image(class_index: int, image_index: int, num_classes: int = len(SHAPES)) -> Image.Image:
    """The ``image_index``-th RGB image of class ``class_index`` of ``num_classes`` (deterministic); the
    classes' hues are spread evenly around the colour wheel."""
    if not 0 <= class_index < num_classes <= len(SHAPES):
        raise ValueError(f"need 0 <= class_index < num_classes <= {len(SHAPES)}, got {class_index}, {num_classes}")
    rng = np.random.default_rng([class_index, image_index, DEMO_VERSION])
    w, h = (int(v) for v in rng.integers(96, 145, size=2))
    # background: a gradient between two random dull colours, plus noise
    c0, c1 = rng.uniform(0, 160, size=(2, 3))
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    bg = c0 * (1 - t) + c1 * t + rng.normal(0, 12, size=(h, w, 3))
    img = Image.fromarray(np.clip(np.broadcast_to(bg, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    hue = (class_index / num_classes + rng.uniform(-0.03, 0.03)) % 1.0
    colour = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0)))
    r = rng.uniform(0.2, 0.35) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    rot = rng.uniform(0, 2 * math.pi)
    shape = SHAPES[class_index]
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=colour)
    elif shape == "cross":
        for a in (rot, rot + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=max(3, int(r / 2.5)))
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(3, int(r / 3)))
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=colour)
    elif shape == "diamond":
        pts = [(cx + r * 0.6 * math.cos(rot), cy + r * 0.6 * math.sin(rot)),
               (cx - r * math.sin(rot), cy + r * math.cos(rot)),
               (cx - r * 0.6 * math.cos(rot), cy - r * 0.6 * math.sin(rot)),
               (cx + r * math.sin(rot), cy - r * math.cos(rot))]
        draw.polygon(pts, fill=colour)
    elif shape == "stripes":
        for k in range(-2, 3):
            ox, oy = k * r / 2.5 * math.cos(rot), k * r / 2.5 * math.sin(rot)
            dx, dy = -r * math.sin(rot), r * math.cos(rot)
            draw.line([(cx + ox - dx, cy + oy - dy), (cx + ox + dx, cy + oy + dy)], fill=colour,
                      width=max(2, int(r / 8)))
    elif shape == "dots":
        for _ in range(7):
            x, y = rng.uniform(cx - r, cx + r), rng.uniform(cy - r, cy + r)
            d = r / 5
            draw.ellipse([x - d, y - d, x + d, y + d], fill=colour)
    else:  # hexagon
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=colour)
    return img


def make_demo_folder(num_classes: int = 2, images_per_class: int = 96, cache_dir: str | os.PathLike | None = None
                     ) -> Path:
    """Write (once) and return the demo folder ``<root>/<class>/<class>_<i>.jpg``."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"config field data.demo_classes must be in [2, {len(SHAPES)}], got {num_classes}")
    if images_per_class < 2:
        raise ValueError(f"config field data.demo_images must be >= 2, got {images_per_class}")
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    root = base / "demo" / f"v{DEMO_VERSION}_{num_classes}x{images_per_class}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp_"))
    try:
        for k in range(num_classes):
            d = tmp / SHAPES[k]
            d.mkdir()
            for i in range(images_per_class):
                draw_demo_image(k, i, num_classes).save(d / f"{SHAPES[k]}_{i:04d}.jpg", quality=90)
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.is_dir():  # lost a race to another process: fine; anything else is an error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
