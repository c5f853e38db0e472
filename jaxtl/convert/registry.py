"""Pretrained weights: a registry of official files, a verified download cache, and ``load_pretrained``.

``load_pretrained("resnet34.tv_in1k", "resnet34")`` downloads the official file once into the cache
(``cache_dir`` argument, else ``$JAXTL_CACHE``, else ``~/.cache/jaxtl/weights``) with a progress bar,
writing to a temporary file that is renamed into place only after its SHA-256 matches; converts it;
stores the converted jaxtl file under ``<cache>/converted/``; and reuses both on later calls.
A local path (``.pth`` torchvision, timm ``.safetensors`` or a jaxtl file, detected from the bytes)
is loaded directly. Without network access it stops with the URL, the exact file name and the
folder to put it in.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxtl.convert.io import detect_format, load_variables, save_variables
from jaxtl.convert.mapping import load_timm, load_torchvision
from jaxtl.models import ARCHS

ENV_CACHE = "JAXTL_CACHE"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PretrainedEntry:
    """One published checkpoint.

    ``sha256`` is the file's full SHA-256 hex digest. Where no full digest is published, it is the
    hash prefix in the torchvision file name, checked exactly as ``torch.hub``'s ``check_hash`` does
    (the digest must start with it).
    """

    name: str
    arch: str
    url: str
    sha256: str
    filename: str
    format: str  # torchvision | timm
    description: str = ""


class PretrainedUnavailableError(RuntimeError):
    """The weights file could not be downloaded (offline, blocked, 404, ...)."""


class HashMismatchError(RuntimeError):
    """A downloaded or cached weights file does not have the registered SHA-256."""


_TV = "https://download.pytorch.org/models/"
_HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"

# Full SHA-256 digests of the official files, as recorded by several independent public projects
# that pin them (each starts with torchvision's file-name prefix, which torch.hub itself checks).
REGISTRY: dict[str, PretrainedEntry] = {
    e.name: e
    for e in [
        PretrainedEntry("resnet18.tv_in1k", "resnet18", _TV + "resnet18-f37072fd.pth",
                        "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
                        "resnet18-f37072fd.pth", "torchvision", "torchvision IMAGENET1K_V1"),
        PretrainedEntry("resnet34.tv_in1k", "resnet34", _TV + "resnet34-b627a593.pth",
                        "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f",
                        "resnet34-b627a593.pth", "torchvision", "torchvision IMAGENET1K_V1 (fastai's default)"),
        PretrainedEntry("resnet50.tv_in1k", "resnet50", _TV + "resnet50-0676ba61.pth",
                        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
                        "resnet50-0676ba61.pth", "torchvision", "torchvision IMAGENET1K_V1"),
        PretrainedEntry("resnet50.tv2_in1k", "resnet50", _TV + "resnet50-11ad3fa6.pth",
                        "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",
                        "resnet50-11ad3fa6.pth", "torchvision", "torchvision IMAGENET1K_V2"),
        PretrainedEntry("resnet101.tv_in1k", "resnet101", _TV + "resnet101-63fe2227.pth",
                        "63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a",
                        "resnet101-63fe2227.pth", "torchvision", "torchvision IMAGENET1K_V1"),
        PretrainedEntry("resnet101.tv2_in1k", "resnet101", _TV + "resnet101-cd907fc2.pth",
                        "cd907fc2a0de2292b2ba2b27d2216bc672d84632d1cf20058d01c0c03b5e020e",
                        "resnet101-cd907fc2.pth", "torchvision", "torchvision IMAGENET1K_V2"),
        PretrainedEntry("resnet152.tv_in1k", "resnet152", _TV + "resnet152-394f9c45.pth",
                        "394f9c45966e3651a89bbb78a48410a6755854ce4a5ab64927cf1c7247f85e58",
                        "resnet152-394f9c45.pth", "torchvision", "torchvision IMAGENET1K_V1"),
        # No full digest of this file was found published anywhere; verify torchvision's own
        # file-name prefix exactly as torch.hub.download_url_to_file(hash_prefix=...) does.
        PretrainedEntry("resnet152.tv2_in1k", "resnet152", _TV + "resnet152-f82ba261.pth",
                        "f82ba261", "resnet152-f82ba261.pth", "torchvision", "torchvision IMAGENET1K_V2"),
        # timm "ResNet strikes back" A1 weights from the Hugging Face hub (the digest is the LFS oid).
        PretrainedEntry("resnet18.a1_in1k", "resnet18", _HF.format("resnet18.a1_in1k"),
                        "80c49dee3da4822c009c5a7fe591e9223c5a2cfcf95a4067ca4dfb5a7b89c612",
                        "resnet18.a1_in1k.safetensors", "timm", "timm RSB A1"),
        PretrainedEntry("resnet34.a1_in1k", "resnet34", _HF.format("resnet34.a1_in1k"),
                        "829a220f9529d2b1ffdc8719d3273463001e0daf411eaf1916865d9db62c0ed2",
                        "resnet34.a1_in1k.safetensors", "timm", "timm RSB A1"),
        PretrainedEntry("resnet50.a1_in1k", "resnet50", _HF.format("resnet50.a1_in1k"),
                        "773525d5821de224f8f30c33377b7a795d7863e08522698200d3217d3f2a41bb",
                        "resnet50.a1_in1k.safetensors", "timm", "timm RSB A1"),
    ]
}


def register(entry: PretrainedEntry, *, overwrite: bool = False) -> None:
    """Add a checkpoint to the registry (e.g. a private mirror)."""
    if entry.arch not in ARCHS:
        raise ValueError(f"registry entry {entry.name}: arch {entry.arch!r} is not one of {sorted(ARCHS)}")
    if entry.format not in ("torchvision", "timm"):
        raise ValueError(f"registry entry {entry.name}: format must be torchvision or timm, got {entry.format!r}")
    if entry.name in REGISTRY and not overwrite:
        raise ValueError(f"registry entry {entry.name} already exists (pass overwrite=True)")
    REGISTRY[entry.name] = entry


def default_cache_dir() -> Path:
    """``$JAXTL_CACHE`` if set, else ``~/.cache/jaxtl/weights``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxtl" / "weights"


def hash_matches(digest: str, expected: str) -> bool:
    """Full-digest equality, or torch.hub's prefix rule when only a prefix is registered."""
    expected = expected.lower()
    return digest == expected if len(expected) == 64 else digest.startswith(expected)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _offline_message(entry: PretrainedEntry, dest: Path, reason: str) -> str:
    return (
        f"could not download the pretrained weights {entry.name!r} ({reason}).\n"
        f"  Download this URL by hand: {entry.url}\n"
        f"  and save it as the file {entry.filename!r} in the folder {dest.parent}\n"
        f"  (full path: {dest}; set {ENV_CACHE} or model.weights_dir to use another folder),\n"
        f"  or set model.pretrained to the path of a local copy, e.g. model.pretrained=/path/to/{entry.filename}"
    )


def download(entry: PretrainedEntry, dest: Path, *, progress: bool = True) -> Path:
    """Fetch ``entry.url`` to ``dest`` via a temp file in the same folder, verify SHA-256, rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                resp = urllib.request.urlopen(entry.url, timeout=60)
            except urllib.error.HTTPError as e:
                raise PretrainedUnavailableError(_offline_message(entry, dest, f"HTTP {e.code} {e.reason}")) from e
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise PretrainedUnavailableError(_offline_message(entry, dest, f"no connection: {reason}")) from e
            with resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.filename,
                          disable=not progress) as bar:
                    try:
                        while chunk := resp.read(_CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
                    except OSError as e:
                        raise PretrainedUnavailableError(
                            _offline_message(entry, dest, f"download interrupted: {e}")) from e
        digest = h.hexdigest()
        if not hash_matches(digest, entry.sha256):
            raise HashMismatchError(
                f"{entry.url} downloaded with SHA-256 {digest}, but the registry expects {entry.sha256} for "
                f"{entry.name!r}; the file was discarded (corrupt download or a changed file upstream)."
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def fetch(entry: PretrainedEntry, cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Path of the verified raw file for ``entry`` in the cache, downloading it if absent."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dest = cache / entry.filename
    if dest.is_file():
        digest = sha256_file(dest)
        if not hash_matches(digest, entry.sha256):
            raise HashMismatchError(
                f"{dest} has SHA-256 {digest}, but {entry.name!r} expects {entry.sha256}: it is not the "
                f"official file. Delete it (it will be downloaded again from {entry.url}) or replace it."
            )
        return dest
    return download(entry, dest, progress=progress)


def convert_file(path: str | os.PathLike, arch: str, fmt: str = "auto", *, strict: bool = True) -> dict[str, Any]:
    """Variables from a local weights file; ``fmt`` is ``auto`` | ``torchvision`` | ``timm`` | ``jaxtl``."""
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "torchvision":
        return load_torchvision(str(path), arch, strict=strict)
    if fmt == "timm":
        return load_timm(str(path), arch, strict=strict)
    if fmt == "jaxtl":
        variables, meta = load_variables(path)
        if meta["arch"] != arch:
            raise ValueError(f"{path} holds {meta['arch']} weights, but the model is arch={arch!r}: set "
                             f"model.arch={meta['arch']} or use a {arch} weights file")
        return variables
    raise ValueError(f"unknown weights format {fmt!r}; use auto, torchvision, timm or jaxtl")


def _head_meta(variables: dict[str, Any]) -> dict[str, str]:
    head = variables.get("params", {}).get("head", {})
    if "fc" in head:
        return {"head": "linear", "num_classes": str(head["fc"]["bias"].shape[0])}
    return {"head": "none", "num_classes": "0"}


DEMO_PREFIX = "demo:"


def demo_weights_file(spec: str, arch: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``demo:<arch>[:seed]`` -> a seeded, randomly initialised ``arch`` with a 1000-class fc, written once
    in torchvision's state-dict names as safetensors (timm's file layout) into ``<cache>/demo/``.

    It stands in for a downloaded ImageNet file where there is no network (the README's demo job), so
    the demo runs the same convert-and-merge path as ``resnet34.tv_in1k``.
    """
    parts = spec[len(DEMO_PREFIX):].split(":")
    if parts[0] != arch:
        raise ValueError(f"model.pretrained={spec!r} names {parts[0]!r} but model.arch={arch!r}; use demo:{arch}")
    seed = int(parts[1]) if len(parts) > 1 else 0
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = cache / "demo" / f"{arch}-seed{seed}.safetensors"
    if path.is_file():
        return path
    import jax
    import jax.numpy as jnp
    import safetensors.numpy

    from jaxtl.convert.mapping import variables_to_state_dict
    from jaxtl.models import create_model

    model = create_model(arch, 1000, head="linear")
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(seed))
    sd = variables_to_state_dict(jax.tree_util.tree_map(np.asarray, variables), arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    safetensors.numpy.save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def _read_converted(converted: Path, arch: str, valid: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The variables cached in the jaxtl file ``converted`` if it holds ``arch`` and ``valid(meta)``; ``None`` when
    it is missing, stale, or damaged (it is then converted again and replaced)."""
    if not converted.is_file():
        return None
    try:
        variables, meta = load_variables(converted)
    except (OSError, ValueError):
        return None
    return variables if meta.get("arch") == arch and valid(meta) else None


def _write_converted(converted: Path, arch: str, variables: dict[str, Any], source_meta: dict[str, str]) -> None:
    try:
        save_variables(converted, variables, {"arch": arch, **_head_meta(variables), **source_meta})
    except OSError:  # a cache that cannot be written only means converting each time
        pass


def _load_demo(source: Path, arch: str) -> dict[str, Any]:
    """The demo file converted once and cached beside it (``<name>.converted.safetensors``), as a registry
    download is; valid while the source file's size and modification time are those it was converted from."""
    converted = source.with_name(source.stem + ".converted.safetensors")
    st = source.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    variables = _read_converted(converted, arch, lambda meta: meta.get("source_stat") == stamp)
    if variables is None:
        variables = convert_file(source, arch, "timm")
        _write_converted(converted, arch, variables, {"source": str(source), "source_stat": stamp})
    return variables


def load_pretrained(
    spec: str, arch: str, cache_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Pretrained variables for ``arch`` from a registry name or a local weights file.

    Registry names (see ``REGISTRY``, e.g. ``resnet34.tv_in1k``, ``resnet50.a1_in1k``) are
    downloaded once, verified, converted, and the converted file cached; local files are detected
    by content. Returns ``{"params": {"body", ["head"]}, "batch_stats": {"body"}}`` (NumPy leaves);
    combine with a freshly initialised model through :func:`jaxtl.convert.merge_pretrained`.
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is not known; choose one of {sorted(ARCHS)}")
    if spec.startswith(DEMO_PREFIX):
        return _load_demo(demo_weights_file(spec, arch, cache_dir), arch)
    path = Path(spec).expanduser()
    if path.is_file():
        return convert_file(path, arch)
    entry = REGISTRY.get(spec)
    if entry is None and (os.sep in spec or path.suffix in (".pth", ".pt", ".bin", ".safetensors")):
        raise FileNotFoundError(f"model.pretrained={spec!r}: weights file not found ({path.resolve()})")
    if entry is None:
        raise ValueError(
            f"model.pretrained={spec!r} is neither an existing file nor a registry name. Known names: "
            f"{', '.join(sorted(REGISTRY))}; or give the path of a .pth / .safetensors file."
        )
    if entry.arch != arch:
        raise ValueError(f"model.pretrained={spec!r} holds {entry.arch} weights, but model.arch={arch!r}: set "
                         f"model.arch={entry.arch} or pick a {arch} checkpoint "
                         f"({', '.join(n for n, e in sorted(REGISTRY.items()) if e.arch == arch) or 'none'})")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    converted = cache / "converted" / f"{entry.name}.safetensors"
    variables = _read_converted(converted, arch,
                                lambda meta: hash_matches(meta.get("source_sha256", ""), entry.sha256))
    if variables is not None:
        return variables
    raw = fetch(entry, cache, progress=progress)
    variables = convert_file(raw, arch, entry.format)
    _write_converted(converted, arch, variables, {"source": entry.url, "source_sha256": sha256_file(raw),
                                                  "registry_name": entry.name})
    return variables
