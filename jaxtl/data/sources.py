"""Where the images come from and how they are labelled and split (no TF ops here).

* ``folder``: labels are the parent folder names (ImageNet / hymenoptera layout). ``root/train`` with
  ``root/valid`` (or ``root/val``) is an explicit split; otherwise (or with ``train/`` alone) a random
  ``valid_pct`` split.
* ``name_func``: a flat (or nested) folder or a file list, labelled by a function of the file *name*:
  ``is_cat`` (Oxford-IIIT Pet: the first letter is upper-case), ``regex:<pattern>`` (``re.search`` on the name,
  group 1; ``^(.+)_\\d+\\.jpg$`` gives the 37 Pet breeds) or any Python callable.
* ``tfds``: a prepared TFDS dataset (see :func:`resolve_tfds` and ``jaxtl/data/tfds_items.py``), labelled by
  the example's ``file_name`` feature with the same ``is_cat`` / ``regex:`` rules, or by a dataset feature
  (``feature:<name>``).

The random split is fastai's ``RandomSplitter(valid_pct, seed)`` exactly (:func:`torch_randperm`): the items
are listed in a fixed order first -- jaxtl sorts files by path (fastai's ``get_image_files`` follows
``os.walk``, whose order depends on the file system), TFDS examples by ``file_name`` -- then the first
``int(valid_pct * n)`` positions of ``torch.randperm(n)`` after ``torch.manual_seed(seed)`` are the validation set.
So ``RandomSplitter(valid_pct, seed)(sorted(files))`` in fastai picks the same validation files as jaxtl.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp"})
VALID_DIRS = ("valid", "val")
SOURCES = ("folder", "name_func", "tfds", "demo")  # data.source: build_data's item sources
ON_CORRUPT = ("skip", "error")  # data.on_corrupt: what the corrupt-file scan does with unreadable files


class DataWarning(UserWarning):
    """Something about the data that training can go on with (corrupt files skipped, odd class split)."""


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root`` (recursive, case-insensitive extension, hidden entries skipped), sorted."""
    def unreadable(err: OSError) -> None:  # os.walk would silently skip the folder (and its images)
        raise type(err)(f"cannot read the folder {err.filename} ({err.strerror}); fix its permissions (e.g. chmod "
                        "-R a+rX) or move it out of the data folder") from err

    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / f)
    return sorted(out, key=lambda p: p.as_posix())


def is_cat(name: str) -> bool:
    """Oxford-IIIT Pet rule: cat breeds' file names start with an upper-case letter."""
    return name[:1].isupper()


def regex_labeller(pattern: str) -> Callable[[str], str]:
    """``re.search(pattern, name).group(1)``; raises ``ValueError`` naming the file when it does not match."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"config field data.label='regex:{pattern}': invalid regular expression: {e}") from e
    if rx.groups < 1:
        raise ValueError(f"config field data.label='regex:{pattern}' needs one group '(...)' that captures the label")

    def label(name: str) -> str:
        m = rx.search(name)
        if m is None:
            raise ValueError(f"data.label regex {pattern!r} does not match the file name {name!r}")
        return m.group(1)

    return label


def name_labeller(label: str, source: str) -> Callable[[str], str]:
    """``file name -> class name`` for ``data.label='is_cat'`` or ``'regex:<pattern>'`` (any source)."""
    if label == "is_cat":
        return lambda name: str(is_cat(name))
    if label.startswith("regex:"):
        return regex_labeller(label[len("regex:"):])
    raise ValueError(f"config field data.label={label!r} does not label by file name (data.source={source!r}); "
                     "use 'is_cat' or 'regex:<pattern>'")


def make_labeller(label: str, label_func: Callable[[Any], Any] | None, source: str) -> Callable[[Path], str]:
    """``Path -> class name`` for ``data.label`` (``parent`` | ``is_cat`` | ``regex:...``) or ``label_func``.

    ``label_func`` receives the file name (``str``) for ``source='name_func'`` (fastai's ``from_name_func``)
    and the full ``pathlib.Path`` for ``source='folder'`` (fastai's ``from_path_func``); its result is str()-ed.
    """
    if label_func is not None:
        if source == "name_func":
            return lambda p: str(label_func(p.name))
        return lambda p: str(label_func(p))
    if label == "parent":
        if source == "name_func":
            raise ValueError("data.source='name_func' labels images by their file name: set data.label to "
                             "'is_cat' or 'regex:<pattern>' (or pass label_func=... to build_data)")
        return lambda p: p.parent.name
    if label.startswith("feature:"):
        raise ValueError(f"config field data.label={label!r} takes a TFDS feature, but data.source={source!r} reads "
                         "image files; use 'parent' (folder names), 'is_cat' or 'regex:<pattern>' (file names)")
    by_name = name_labeller(label, source)
    return lambda p: by_name(p.name)


# torch's CPU randperm draws 32-bit numbers below this n and 64-bit ones from it on (aten randperm_cpu).
_RANDPERM_32BIT_LIMIT = (2**32 - 1) // 20


def _mt19937_raw(seed: int, count: int) -> np.ndarray:
    """The first ``count`` 32-bit outputs of MT19937 seeded as ``torch.manual_seed(seed)`` seeds torch's CPU
    generator (Matsumoto & Nishimura's ``init_genrand`` on the low 32 bits). The state is built here and the
    twister itself is numpy's ``MT19937`` bit generator (``random_raw``); numpy's own seeding differs."""
    key = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": np.array(key, np.uint32), "pos": 624}}
    return bits.random_raw(count)


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """``torch.manual_seed(seed); torch.randperm(n)`` on the CPU, without torch (fastai's RandomSplitter).

    torch fills ``0..n-1`` and swaps position ``i`` with ``i + r_i % (n - i)`` for ``i < n-1`` (a Fisher-Yates
    shuffle), ``r_i`` the i-th 32-bit MT19937 output. Checked against torch in tests/data/test_data_sources.py.
    """
    if n >= _RANDPERM_32BIT_LIMIT:
        raise ValueError(f"a random split of {n} items is not supported: torch.randperm switches to 64-bit draws at "
                         f"{_RANDPERM_32BIT_LIMIT} items, which jaxtl does not reproduce; use explicit splits")
    steps = np.arange(max(n - 1, 0), dtype=np.int64)
    targets = (_mt19937_raw(int(seed), len(steps)).astype(np.int64) % (n - steps) + steps).tolist()
    perm = list(range(n))
    for i, j in enumerate(targets):  # sequential swaps: each depends on the previous ones
        perm[i], perm[j] = perm[j], perm[i]
    return np.array(perm, np.int64)


def random_split(n: int, valid_pct: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """fastai's ``RandomSplitter(valid_pct, seed)`` on ``n`` ordered items: ``(train_idx, valid_idx)``, each
    sorted ascending (fastai keeps them in permutation order; the sets are the same)."""
    perm = torch_randperm(n, seed)
    cut = int(valid_pct * n)
    return np.sort(perm[cut:]), np.sort(perm[:cut])


@dataclass
class FileSplit:
    """Labelled file items of both splits and where they came from (for messages)."""

    train: list[tuple[str, str]]
    valid: list[tuple[str, str]]
    root: str
    how: str  # human description of the split
    warnings: list[str] = field(default_factory=list)


def label_all(items: Sequence[Any], labeller: Callable[[Any], str], where: str) -> list[tuple[str, str]]:
    """``[(str(item), label)]``; every item that cannot be labelled is named in one ``ValueError``."""
    out, bad = [], []
    for p in items:
        try:
            out.append((str(p), labeller(p)))
        except ValueError as e:
            bad.append(f"{getattr(p, 'name', p)}: {e}")
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"could not label {len(bad)} of {len(items)} image file(s) under {where}:\n  {shown}")
    return out


def _split_list(items: list[tuple[str, str]], valid_pct: float, seed: int) -> tuple[list, list]:
    tr, va = random_split(len(items), valid_pct, seed)
    return [items[i] for i in tr], [items[i] for i in va]


def folder_split(
    root: str | os.PathLike,
    label: str = "parent",
    valid_pct: float = 0.2,
    seed: int = 42,
    label_func: Callable[[Any], Any] | None = None,
) -> FileSplit:
    """Items of an image folder: explicit ``train/`` + ``valid/`` (or ``val/``) sub-folders, else ``valid_pct``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={str(root)!r} is not a folder (data.source='folder')")
    labeller = make_labeller(label, label_func, "folder")
    train_dir = root / "train"
    valid_dir = next((root / d for d in VALID_DIRS if (root / d).is_dir()), None)
    if train_dir.is_dir() and valid_dir is not None:
        train = label_all(list_images(train_dir), labeller, str(train_dir))
        valid = label_all(list_images(valid_dir), labeller, str(valid_dir))
        if not train:
            raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {train_dir}")
        return FileSplit(train, valid, str(root), f"folders {train_dir.name}/ and {valid_dir.name}/")
    base = train_dir if train_dir.is_dir() else root
    items = label_all(list_images(base), labeller, str(base))
    if not items:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {base} "
                         "(data.source='folder' expects <root>/<class>/<image> or <root>/{train,valid}/<class>/...)")
    train, valid = _split_list(items, valid_pct, seed)
    return FileSplit(train, valid, str(root), f"random valid_pct={valid_pct} split (data.seed={seed}) of {base}")


def name_func_split(
    path: str | os.PathLike | None,
    label: str,
    valid_pct: float = 0.2,
    seed: int = 42,
    label_func: Callable[[Any], Any] | None = None,
    files: Sequence[str | os.PathLike] | None = None,
) -> FileSplit:
    """Items labelled by file name, random ``valid_pct`` split.

    The files are ``files`` when given, else the images under ``path`` (a folder), or the lines of ``path``
    when it is a text file (one path per line, relative paths from the text file's folder).
    """
    labeller = make_labeller(label, label_func, "name_func")
    if files is not None:
        paths = sorted((Path(f) for f in files), key=lambda p: p.as_posix())
        where = f"the {len(paths)} files given"
        root = os.path.commonpath([str(p.absolute()) for p in paths]) if paths else str(path or ".")
    else:
        if not path:
            raise ValueError("config field data.path is empty but data.source='name_func' needs a folder or file list")
        p = Path(path)
        if p.is_file():
            lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            paths = sorted(((p.parent / ln) for ln in lines), key=lambda q: q.as_posix())
            missing = [str(q) for q in paths if not q.exists()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} file(s) listed in {p} do not exist, e.g. {missing[:3]}")
            where, root = str(p), str(p.parent)
        elif p.is_dir():
            paths, where, root = list_images(p), str(p), str(p)
        else:
            raise FileNotFoundError(
                f"data.path={str(p)!r} is neither a folder nor a file list (data.source='name_func')")
    if not paths:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {where}")
    items = label_all(paths, labeller, where)
    train, valid = _split_list(items, valid_pct, seed)
    return FileSplit(train, valid, root, f"random valid_pct={valid_pct} split (data.seed={seed}) of {where}")


def check_classes(train_labels: Sequence[str], valid_labels: Sequence[str], where: str) -> tuple[list[str], list[str]]:
    """Sorted class list (fastai's ``CategoryMap``: sorted unique) and warnings; errors for unusable data."""
    train_set, valid_set = set(train_labels), set(valid_labels)
    classes = sorted(train_set | valid_set)
    warns = []
    if not train_labels:
        raise ValueError(f"the training set under {where} is empty")
    if len(classes) < 2:
        raise ValueError(
            f"only one class ({classes[0]!r}) found under {where}; a classifier needs at least 2. With "
            "data.label='parent' each class needs its own sub-folder: <root>/<class>/<image>")
    only_valid = sorted(valid_set - train_set)
    if only_valid:
        warns.append(f"class(es) {only_valid} under {where} appear only in the validation set; the model "
                     "cannot learn them (they count as errors)")
    only_train = sorted(train_set - valid_set)
    if valid_labels and only_train:
        warns.append(f"class(es) {only_train} under {where} have no validation images")
    if not valid_labels:
        warns.append(f"the validation set under {where} is empty (data.valid_pct is 0 or valid/ has no images); "
                     "there will be no validation metrics")
    return classes, warns


# --------------------------------------------------------------------------------------------- TFDS

_TFDS_NAME = re.compile(r"^(?P<name>[\w\-]+)(?:/(?P<config>[\w\-.]+))?(?::(?P<version>[\d.*]+))?$")


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")) if re.fullmatch(r"\d+(\.\d+)*", v) else (-1,)


def tfds_help(name: str, data_dir: str) -> str:
    """What to run to make a TFDS dataset available to jaxtl offline."""
    return (
        f"jaxtl downloads a missing TFDS dataset only when data.download is true and the network is reachable. "
        f"On a machine with internet run\n    tfds build {name} --data_dir={data_dir}\n(or python -c \"import "
        f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"),"
        f" then copy {data_dir}/{name.split(':')[0].split('/')[0]} to this machine's data_dir "
        f"(config field data.data_dir). Datasets that need a manual download read their archives from "
        f"{data_dir}/downloads/manual (TFDS manual_dir). With internet, set "
        "--config.data.download=true to let TFDS download it during the run.")


def resolve_tfds(tfds_name: str, data_dir: str) -> str:
    """Folder of a prepared TFDS dataset: ``<data_dir>/<name>[/<config>]/<version>`` holding ``dataset_info.json``.

    Looks at the disk only (no network, unlike ``tfds.builder`` which may query GCS for metadata); the newest
    prepared version wins unless ``name:version`` pins one. Raises ``FileNotFoundError`` with what to download
    and where.
    """
    m = _TFDS_NAME.match(tfds_name.strip())
    if not m:
        raise ValueError(f"config field data.tfds_name={tfds_name!r} is not a TFDS name like "
                         "'oxford_iiit_pet', 'tf_flowers:3.0.1' or 'name/config:1.0.0'")
    name, config, version = m.group("name"), m.group("config"), m.group("version")
    base = Path(data_dir) / name

    def versions(d: Path) -> list[Path]:
        if not d.is_dir():
            return []
        vs = [v for v in d.iterdir() if v.is_dir() and (v / "dataset_info.json").is_file()]
        if version:
            pat = re.compile("^" + re.escape(version).replace(r"\*", r"\d+") + "$")
            vs = [v for v in vs if pat.match(v.name)]
        return sorted(vs, key=lambda v: _version_key(v.name))

    if config:
        found = versions(base / config)
    else:
        found = versions(base)
        if not found and base.is_dir():
            configs = [c for c in sorted(base.iterdir()) if versions(c)]
            if len(configs) > 1:
                raise ValueError(f"TFDS dataset {name!r} under {base} has several prepared configs "
                                 f"{[c.name for c in configs]}; set data.tfds_name='{name}/<config>'")
            if configs:
                found = versions(configs[0])
    if not found:
        raise FileNotFoundError(
            f"TFDS dataset {tfds_name!r} is not prepared under data_dir={data_dir} "
            f"(no {base}/[<config>/]<version>/dataset_info.json).\n" + tfds_help(tfds_name, data_dir))
    return str(found[-1])
