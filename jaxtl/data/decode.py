"""Image decoding in TF ops and the corrupt-file scan that runs before training.

Decoding: ``tf.io.decode_image(channels=3, expand_animations=False)`` reads JPEG, PNG, GIF (first frame), BMP
and WebP and turns grayscale, palette, RGBA and CMYK (JPEG) into RGB. JPEGs (found by their magic bytes, not
their extension) take ``tf.image.decode_and_crop_jpeg`` so that a training crop decodes only its window.

Scan: every file is decoded once by a parallel ``tf.data`` pass with the same decoder as training; the ones
that fail (0 bytes, truncated, not an image) are listed with the decoder's message. Results are cached per
file (absolute path, size, mtime) in a JSON file, so a second build only stats the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxtl.data.tf_import import tf

log = logging.getLogger("jaxtl.data")

SCAN_VERSION = 1


def graph_fn(fn: Callable) -> Callable:
    """Mark a tf.data map/filter function as plain graph code. tf.data otherwise runs every such function
    through AutoGraph, whose Python AST rewrite costs 0.2-1.6 s per pipeline build (every epoch and at start-up);
    jaxtl's functions use explicit ``tf.cond`` / ``tf.where``, so there is nothing for AutoGraph to convert."""
    return tf.autograph.experimental.do_not_convert(fn)


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes (scalar string) -> uint8 ``(h, w, 3)``; GIF gives its first frame."""
    img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return img


def decode_crop(data: tf.Tensor, crop_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """Decode and crop: ``crop_fn(height, width) -> [top, left, crop_h, crop_w]`` (int32).

    JPEGs decode only the window (``decode_and_crop_jpeg``); other formats decode fully, then slice.
    """
    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(data)
        box = crop_fn(shape[0], shape[1])
        img = tf.image.decode_and_crop_jpeg(data, box, channels=3)
        img.set_shape([None, None, 3])
        return img

    def other() -> tf.Tensor:
        img = decode_rgb(data)
        shape = tf.shape(img)
        box = crop_fn(shape[0], shape[1])
        return crop_box(img, box)

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def crop_box(image: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
    """Slice ``image[top:top+h, left:left+w]`` for ``box = [top, left, h, w]``."""
    return tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], 3]))


def tf_error_message(e: BaseException) -> str:
    """The readable part of a TF op error (drops ``{{function_node ...}}`` and ``[Op:...]`` decorations)."""
    msg = str(getattr(e, "message", None) or e).strip()
    msg = re.sub(r"\{\{function_node[^}]*\}\}\s*", "", msg)
    msg = re.sub(r"\s*\[Op:\w+\].*$", "", msg, flags=re.S)
    return msg.splitlines()[0].strip() if msg else type(e).__name__


def load_bytes(path_or_bytes: str | os.PathLike | bytes) -> bytes:
    """Raw file contents (``bytes`` pass through)."""
    if isinstance(path_or_bytes, bytes | bytearray):
        return bytes(path_or_bytes)
    with open(path_or_bytes, "rb") as f:
        return f.read()


def default_cache_dir() -> Path:
    """``$JAXTL_CACHE_DIR`` or ``~/.cache/jaxtl``."""
    return Path(os.environ.get("JAXTL_CACHE_DIR") or Path.home() / ".cache" / "jaxtl")


def _scan_cache_file(cache_dir: Path, root: str) -> Path:
    key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    return cache_dir / "scan" / f"{key}.json"


def _decode_errors(paths: Sequence[str], num_parallel: int) -> dict[str, str]:
    """Decode every file in parallel; return ``{path: error message}`` for the ones that fail."""
    if not paths:
        return {}
    idx = tf.data.Dataset.range(len(paths))
    files = tf.data.Dataset.from_tensor_slices(list(paths))
    ds = tf.data.Dataset.zip((idx, files)).map(
        graph_fn(lambda i, p: (i, tf.shape(decode_rgb(tf.io.read_file(p))))),
        num_parallel_calls=num_parallel, deterministic=False)
    # ignore_errors drops the failing elements; the indices that never come out are the bad files.
    good = {int(i) for i, _ in ds.ignore_errors().as_numpy_iterator()}
    errors = {}
    for i, p in enumerate(paths):
        if i in good:
            continue
        try:  # decode again alone to get the decoder's message (a file that now decodes is fine)
            decode_rgb(tf.io.read_file(p))
        except (tf.errors.OpError, OSError) as e:
            msg = tf_error_message(e)
            if os.path.getsize(p) == 0:
                msg = "empty file (0 bytes)"
            errors[p] = msg
    return errors


def scan_images(
    paths: Sequence[str],
    root: str,
    cache_dir: str | os.PathLike | None = None,
    num_parallel: int = tf.data.AUTOTUNE,
) -> dict[str, str]:
    """Find unreadable images before training: ``{path: reason}`` for every file that fails to decode.

    Results are cached in ``<cache_dir>/scan/<hash of root>.json`` keyed by (size, mtime_ns), so unchanged
    files are not decoded again. ``cache_dir=None`` uses :func:`default_cache_dir`; ``""`` disables caching.
    """
    use_cache = cache_dir != ""
    cache_file = _scan_cache_file(Path(cache_dir) if cache_dir else default_cache_dir(), root) if use_cache \
        else None
    cached: dict[str, list] = {}
    if cache_file is not None and cache_file.exists():
        try:
            blob = json.loads(cache_file.read_text())
            if blob.get("version") == SCAN_VERSION:
                cached = blob.get("files", {})
        except (OSError, ValueError):
            cached = {}
    stats: dict[str, tuple[int, int]] = {}
    todo, errors = [], {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            errors[p] = f"cannot stat: {e.strerror}"
            continue
        stats[p] = (st.st_size, st.st_mtime_ns)
        hit = cached.get(os.path.abspath(p))
        if hit is not None and tuple(hit[:2]) == stats[p]:
            if hit[2] is not None:
                errors[p] = hit[2]
        else:
            todo.append(p)
    if todo:
        log.info("jaxtl.data: checking %d image file(s) under %s for corrupt files", len(todo), root)
        errors.update(_decode_errors(todo, num_parallel))
    if cache_file is not None and todo:
        for p, (size, mtime) in stats.items():
            cached[os.path.abspath(p)] = [size, mtime, errors.get(p)]
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": SCAN_VERSION, "root": os.path.abspath(root), "files": cached}, f)
            os.replace(tmp, cache_file)
        except OSError as e:  # a read-only cache only costs a re-scan next time
            log.warning("jaxtl.data: could not write the scan cache %s: %s", cache_file, e)
    return {p: errors[p] for p in paths if p in errors}
