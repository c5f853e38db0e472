"""jaxtl's weight file format and file-type detection.

A jaxtl weights file is a safetensors file whose tensor names are the variable tree's paths joined
with ``/`` (``params/body/conv1/kernel``, ``batch_stats/body/bn1/mean``, ...) and whose string
metadata holds at least ``format="jaxtl"``, ``arch``, ``head`` (``linear`` | ``fastai`` | ``none``)
and ``num_classes`` (``0`` when there is no head). Safetensors is a flat, pickle-free format: reading
it cannot run code.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

FORMAT = "jaxtl"
REQUIRED_META = ("arch", "head", "num_classes")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"variable tree key {key!r} at {prefix or '/'} must be a non-empty str without '/'")
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = np.ascontiguousarray(np.asarray(value))
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write ``variables`` (nested dicts of arrays) as a jaxtl safetensors file, atomically.

    ``meta`` must give ``arch``; ``head`` defaults to ``linear`` if ``params/head/fc`` exists, else
    ``fastai`` if ``params/head`` exists, else ``none``; ``num_classes`` likewise from the head.
    Other entries are stored as strings. Returns the path written.
    """
    path = Path(path)
    meta = {k: str(v) for k, v in meta.items()}
    if not meta.get("arch"):
        raise ValueError("save_variables: meta must include 'arch' (e.g. {'arch': 'resnet34'})")
    head = variables.get("params", {}).get("head")
    if "head" not in meta:
        meta["head"] = "none" if not head else ("linear" if "fc" in head else "fastai")
    if "num_classes" not in meta:
        last = None if not head else (head.get("fc") or head.get("fc2") or {}).get("kernel")
        meta["num_classes"] = str(int(np.shape(last)[-1])) if last is not None else "0"
    meta["format"] = FORMAT
    flat = _flatten(variables)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.numpy.save_file(flat, tmp, metadata=meta)
        _sort_metadata(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _sort_metadata(path: Path) -> None:
    """Rewrite the header of a fresh safetensors file with its metadata keys sorted, in place.

    safetensors keeps the metadata in a hash map, so the key order (and the file's bytes) changed from one
    process to the next; sorted, the same variables and metadata always give the same bytes. The header keeps
    its length (safetensors pads it with spaces), so the tensor data does not move; if the re-serialised header
    would not fit, the file is left as written.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n or json.loads(new) != json.loads(raw):
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as NumPy arrays (bfloat16 included) plus its metadata."""
    # framework="flax" rather than "numpy": safetensors' numpy backend cannot represent bfloat16.
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="flax") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except SafetensorError as e:  # truncated or damaged: name the file instead of a bare library error
        raise ValueError(f"{path}: damaged or truncated safetensors file ({e}); it is {path.stat().st_size} "
                         "bytes. Download or copy it again.") from e
    return tensors, meta


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a jaxtl weights file: ``(variables, meta)``; ``meta["num_classes"]`` is an int."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a jaxtl weights file (safetensors metadata format={meta.get('format')!r}); "
            "for a timm checkpoint use jaxtl.convert.load_timm, or convert it with "
            "`python -m jaxtl.convert SRC --arch ARCH --out DST`"
        )
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path}: jaxtl metadata lacks {missing}")
    out_meta: dict[str, Any] = dict(meta)
    out_meta["num_classes"] = int(meta["num_classes"])
    return unflatten(tensors), out_meta


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > 100_000_000 or n > path.stat().st_size - 8:
            return None
        raw = f.read(n)
    if not raw.lstrip().startswith(b"{"):
        return None
    try:
        header = json.loads(raw)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def detect_format(path: str | os.PathLike) -> str:
    """``torchvision`` (torch.save zip/legacy pickle), ``timm`` (safetensors) or ``jaxtl`` (our safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
        return "torchvision"
    header = _safetensors_header(path)
    if header is not None:
        meta = header.get("__metadata__") or {}
        return FORMAT if meta.get("format") == FORMAT else "timm"
    raise ValueError(
        f"{path}: unknown weights format (neither a torch.save .pth file nor safetensors; first bytes {magic!r})"
    )
