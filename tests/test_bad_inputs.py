"""What a user can plausibly feed jaxtl, and what jaxtl must do with it: one table of cases.

Each :class:`Case` names the input (built under ``tmp_path`` by ``build``), the entry point it goes through
(``call``), the expected outcome (an exception type, a warning type, a CLI exit code, or success) and a substring
the message must contain. Success cases also run an extra ``check`` (e.g. the image's pixels came through right,
the pickle's sentinel file does not exist). ``pytest -q tests/test_bad_inputs.py -rA`` prints one line per case;
``python tests/test_bad_inputs.py`` prints the table as Markdown (the README's "Reliability" section).

Entry points: ``build_data`` (in process), ``load_pretrained`` (in process), ``prepare_workdir`` (in process),
``cli`` (``python -m jaxtl.main`` in a subprocess: no traceback allowed), ``huge`` and ``multidevice`` (helper
scripts under tests/reliability/, run in fresh processes: one to read its own peak memory, one with 4 CPU devices).
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "reliability"))
import common  # noqa: E402

COLOUR = (200, 40, 90)  # the solid colour of the special images
GREY = round(0.299 * COLOUR[0] + 0.587 * COLOUR[1] + 0.114 * COLOUR[2])  # ITU-R 601 luma, as PIL/libjpeg
SENTINEL_CODE = "import pathlib; pathlib.Path({!r}).write_text('pwned')"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------------------------- inputs
def solid(size=(40, 30), colour=COLOUR):
    from PIL import Image

    return Image.new("RGB", size, colour)


def write(path: Path, data: bytes | None = None, image=None, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    else:
        image.save(path, fmt, **kw)
    return path


def png16(path: Path, rgb16: tuple[int, int, int], w: int = 40, h: int = 30) -> Path:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    row = b"\x00" + np.tile(np.array(rgb16, ">u2"), w).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return write(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * h))
                 + chunk(b"IEND", b""))


def jpeg_bytes(size=(64, 48), seed: int = 0) -> bytes:
    import io

    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def folder(root: Path, special: dict[str, Callable[[Path], Any]] | None = None) -> Path:
    """``root/{train,valid}/{a,b}/`` with 2 + 1 ordinary JPEGs per class, plus each ``special`` writer called with
    the path ``root/<key>`` (e.g. ``train/a/x.png``)."""
    for split, n in (("train", 2), ("valid", 1)):
        for k, cls in enumerate("ab"):
            for i in range(n):
                write(root / split / cls / f"{cls}{i}.jpg", jpeg_bytes(seed=hash((split, k, i)) % 1000))
    for rel, writer in (special or {}).items():
        writer(root / rel)
    return root


def data_cfg(path: Path | str, **kw):
    from jaxtl.config import base_config

    d = base_config().data
    d.path, d.size = str(path), 32
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def data_input(tmp: Path, special: dict | None = None, batch_size: int = 1, **cfg) -> dict:
    return {"data": data_cfg(folder(tmp / "images", special), **cfg), "batch_size": batch_size}


def both_splits(name: str, writer: Callable[[Path], Any]) -> dict[str, Callable[[Path], Any]]:
    """The same special file in train/a and valid/a (the training crop path and the validation path)."""
    return {f"train/a/{name}": writer, f"valid/a/{name}": writer}


def torch_state_dict_file(path: Path, arch: str = "resnet18", legacy: bool = False) -> Path:
    """A torchvision-layout state dict of ``arch`` (zeros: the names and shapes are what matter), saved by torch."""
    import torch

    from jaxtl.convert import name_table

    sd = collections.OrderedDict((k, torch.zeros(v[1])) for k, v in name_table(arch, 1000).items())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    return path


def safetensors_file(path: Path, arch: str = "resnet18") -> Path:
    import safetensors.numpy

    from jaxtl.convert import name_table

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({k: np.zeros(v[1], np.float32) for k, v in name_table(arch, 1000).items()},
                                str(path))
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


class _RunsCode:
    """Unpickling this calls ``exec(code)``: what a malicious ``.pth`` does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def evil_pickle(tmp: Path, zipped: bool) -> dict:
    sentinel = tmp / "PWNED"
    payload = _RunsCode(SENTINEL_CODE.format(str(sentinel)))
    path = tmp / "evil.pth"
    if zipped:  # inside a real torch.save archive, next to a tensor
        import torch

        torch.save({"conv1.weight": torch.zeros(1), "x": payload}, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return {"spec": str(path), "arch": "resnet18", "sentinel": sentinel}


# ----------------------------------------------------------------------------------------------- checks
def pipeline_images(bundle) -> dict[str, np.ndarray]:
    """Run one full training epoch and the validation pass; every value finite; return the validation images
    (denormalised to [0, 1]) by path."""
    n = 0
    for b in bundle.train_batches(0):
        assert b["image"].shape == (bundle.batch_size, bundle.size, bundle.size, 3)
        assert np.isfinite(b["image"]).all()
        n += 1
    assert n == bundle.steps_per_epoch
    out, paths = {}, [p for p, _ in bundle.valid_items]
    images = [img for b in bundle.valid_batches() for img, m in zip(b["image"], b["mask"], strict=True) if m]
    assert len(images) == len(paths) == bundle.num_valid
    for p, img in zip(paths, images, strict=True):
        assert np.isfinite(img).all()
        out[p] = bundle.denormalize(img)
    return out


def colour_is(name: str, rgb: tuple[int, int, int], tol: float = 4.0) -> Callable[[Any, dict], None]:
    """The validation image whose file name is ``name`` came out as the solid colour ``rgb`` (within ``tol``/255)."""
    def check(bundle, inp) -> None:
        images = pipeline_images(bundle)
        (path,) = [p for p in images if Path(p).name == name]
        mean = images[path].reshape(-1, 3).mean(0) * 255
        assert np.abs(mean - np.array(rgb)).max() <= tol, f"{name}: decoded colour {mean.round(1)}, expected {rgb}"
    return check


def skipped(name: str) -> Callable[[Any, dict], None]:
    """The bad file is listed in ``bundle.corrupt``, absent from both splits, and the rest still trains."""
    def check(bundle, inp) -> None:
        bad = [p for p in bundle.corrupt if Path(p).name == name]
        assert bad, f"{name} not in bundle.corrupt {bundle.corrupt}"
        assert all(Path(p).name != name for p, _ in bundle.valid_items)
        assert bundle.num_train == 4 and bundle.num_valid == 2  # folder() has 4 + 2 good images
        pipeline_images(bundle)
    return check


def no_sentinel(result, inp) -> None:
    assert not inp["sentinel"].exists(), "the pickle's code ran"


def no_training(result, inp) -> None:
    """The CLI stopped before any training step: no epoch table, no checkpoint."""
    text = result.stdout + result.stderr
    assert "train_loss" not in text
    wd = inp.get("workdir")
    assert wd is None or not (Path(wd) / "checkpoints").exists() or not any((Path(wd) / "checkpoints").iterdir())


def classes_are(*classes: str) -> Callable[[Any, dict], None]:
    def check(bundle, inp) -> None:
        assert bundle.classes == list(classes), bundle.classes
    return check


def said(text: str) -> Callable[[Any, dict], None]:
    def check(result, inp) -> None:
        assert text in result.stdout + result.stderr, common.tail(result.stdout + result.stderr)
    return check


def all_of(*checks):
    def check(result, inp) -> None:
        for c in checks:
            c(result, inp)
    return check


# ----------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what the user feeds, for the table
    call: str  # build_data | load_pretrained | prepare_workdir | cli | huge | multidevice
    build: Callable[[Path], dict]  # writes the input under tmp_path, returns the call's arguments
    expect: Any  # exception type | warning type | int (CLI exit code) | exception name (multidevice) | None (ok)
    message: str = ""  # must appear in the error / warning / CLI output
    check: Callable[[Any, dict], None] | None = None
    slow: bool = False
    skip: Callable[[], str | None] | None = None  # a reason to skip, decided at run time
    xfail: str | None = None  # known defect outside this suite's files, with the fix (strict xfail)
    note: str = ""  # what ``check`` verifies, for the table

    @property
    def outcome(self) -> str:
        if self.expect is None:
            return "ok"
        if isinstance(self.expect, int):
            return f"exit {self.expect}"
        return self.expect if isinstance(self.expect, str) else self.expect.__name__

    def param(self):
        marks = [pytest.mark.slow] if self.slow else []
        if self.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=self.xfail))
        return pytest.param(self, id=f"{self.id} -> {self.outcome}", marks=marks)


def _errors():
    from jaxtl.convert import ConversionError, TorchFileError, UnsafePickleError
    from jaxtl.data.sources import DataWarning

    return ConversionError, TorchFileError, UnsafePickleError, DataWarning


ConversionError, TorchFileError, UnsafePickleError, DataWarning = _errors()


def cli(*args: str, workdir: bool = True) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        return {"args": list(args), "workdir": tmp / "run" if workdir else None}
    return build


def cli_with(make: Callable[[Path], tuple[list[str], dict]]) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        args, extra = make(tmp)
        return {"args": args, "workdir": tmp / "run", **extra}
    return build


def unreadable_folder(tmp: Path) -> dict:
    root = folder(tmp / "images")
    os.chmod(root / "train" / "a", 0)
    return {"data": data_cfg(root), "batch_size": 1}


def simulated_unreadable(tmp: Path) -> dict:
    """As root, chmod cannot take read access away; simulate what the kernel says to a normal user."""
    root = folder(tmp / "images")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "a" and Path(path).parent.name == "train":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    return {"data": data_cfg(root), "batch_size": 1, "patch": ("os.scandir", scandir)}


def disk_full(tmp: Path) -> dict:
    usage = collections.namedtuple("usage", "total used free")(10 * 2**30, 10 * 2**30 - 10 * 2**20, 10 * 2**20)
    return {"workdir": tmp / "run", "resume": False, "patch": ("jaxtl.main.shutil.disk_usage", lambda p: usage)}


def existing_checkpoints(tmp: Path) -> dict:
    (tmp / "run" / "checkpoints" / "3").mkdir(parents=True)
    return {"workdir": tmp / "run", "resume": False}


def read_only_workdir(tmp: Path) -> dict:
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o555)
    return {"workdir": tmp / "ro" / "run", "resume": False}


def nan_after_good_epoch(tmp: Path) -> tuple[list[str], dict]:
    """A run whose first epoch is fine (checkpoint at step 3), resumed with lr_max=1e30: the loss turns NaN in the
    second epoch."""
    good = ["--config.train.recipe=one_cycle", "--config.train.epochs=2"]
    r = common.run_cli(SHARED[0], *common.TINY_DEMO, *good, "--config.train.max_steps=3", workdir=tmp / "run")
    assert r.returncode == 0, common.tail(r.stderr)
    return [*common.TINY_DEMO, *good, "--config.train.lr=1e30", "--resume"], {"good_args": good}


def kept_checkpoint_is_good(step: int) -> Callable[[Any, dict], None]:
    """The checkpoint named in the message is the latest on disk, loads, has finite parameters and a finite
    validation loss in its history; resuming it with the original learning rate finishes the run."""
    def check(result, inp) -> None:
        import jax

        from jaxtl.checkpoint import Checkpointer, load_variables

        wd = inp["workdir"]
        text = result.stdout + result.stderr
        assert f"last good checkpoint (step {step}) is kept" in text, common.tail(text)
        ck = Checkpointer(wd)
        try:
            assert ck.latest_step() == step
            meta = ck.restore_meta()
        finally:
            ck.close()
        assert meta["history"] and all(math.isfinite(r["valid_loss"]) for r in meta["history"]), meta["history"]
        v = load_variables(wd, best=False)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(v))
        if "good_args" in inp:  # nothing lost: the run continues from the kept checkpoint with a sane lr
            r = common.run_cli(SHARED[0], *common.TINY_DEMO, *inp["good_args"], "--resume", workdir=wd)
            assert r.returncode == 0, common.tail(r.stderr)
            assert f"resumed from step {step}" in r.stderr
            assert len(common.history_rows(wd)) == 2
    return check


def nan_in_first_epoch(tmp: Path) -> tuple[list[str], dict]:
    return [*common.TINY_DEMO, "--config.train.recipe=one_cycle", "--config.train.epochs=2",
            "--config.train.lr=1e30"], {}


def nan_after_last_step_of_epoch(tmp: Path) -> tuple[list[str], dict]:
    """One step per epoch (5 training images, batch 4); lr 1e-3 for step 1, then ~4e29: step 2's update ends
    epoch 1, so its validation loss is already NaN, but the first non-finite *training* loss is step 3's."""
    return ["--config", "configs/demo.py", "--config.data.demo_images=3", "--config.data.size=32",
            "--config.train.batch_size=4", "--config.train.recipe=one_cycle", "--config.train.epochs=3",
            "--config.train.lr=1e30", "--config.train.div=1e33"], {}


NAN_CHECKPOINT_FIX = (
    "jaxtl/learner.py saves the epoch-end checkpoint after validating without looking at the validation loss: "
    "when the epoch's last update makes the model diverge, the checkpoint of that epoch (valid_loss NaN) is saved "
    "and later called 'the last good checkpoint'. Fix in Learner._train_epochs, before "
    "`if finished: self._save(ctx, pos, row=row)`: if int(self.data.num_valid) > 0 and not "
    "math.isfinite(row['valid_loss']): set self.stop_reason to 'validation loss is nan after step {global_step} "
    "...; the last good checkpoint (step {latest}) is kept ...', self.stopped_early = True, print it and return "
    "rows without saving")

SHARED: list[Path] = []  # the session's shared cache dir, set by the fixture below

CASES: list[Case] = [
    # ---- data folders
    Case("empty-data-folder", "data.path with class folders but no files", "build_data",
         lambda t: {"data": data_cfg(((t / "d" / "a").mkdir(parents=True), t / "d")[1]), "batch_size": 1},
         ValueError, "no image files"),
    Case("one-class", "a folder with a single class sub-folder", "build_data",
         lambda t: {"data": data_cfg(folder_one_class(t)), "batch_size": 1}, ValueError, "only one class ('a')"),
    Case("class-only-in-valid", "valid/c/ with no train/c/", "build_data",
         lambda t: data_input(t, {"valid/c/c0.jpg": lambda p: write(p, jpeg_bytes(seed=7))}),
         DataWarning, "class(es) ['c']", check=classes_are("a", "b", "c"), note="classes a, b, c"),
    Case("missing-path", "data.path that does not exist", "build_data",
         lambda t: {"data": data_cfg(t / "nope"), "batch_size": 1}, FileNotFoundError, "is not a folder"),
    Case("unreadable-folder", "a class folder with chmod 000", "build_data", unreadable_folder,
         PermissionError, "cannot read the folder",
         skip=lambda: "running as root: chmod 000 does not stop root (see unreadable-folder-simulated)"
         if IS_ROOT else None),
    Case("unreadable-folder-simulated", "a class folder the OS refuses to list (PermissionError injected)",
         "build_data", simulated_unreadable, PermissionError, "cannot read the folder"),
    Case("dangling-symlink", "x.jpg -> a deleted file", "build_data",
         lambda t: data_input(t, {"train/a/x.jpg": lambda p: p.symlink_to(t / "gone.jpg")}),
         DataWarning, "cannot stat", check=skipped("x.jpg"), note="skipped, the rest trains"),
    Case("zero-byte-jpeg", "an empty x.jpg", "build_data",
         lambda t: data_input(t, both_splits("x.jpg", lambda p: write(p, b""))),
         DataWarning, "empty file (0 bytes)", check=skipped("x.jpg"), note="skipped, the rest trains"),
    Case("truncated-jpeg", "the first 40% of a JPEG", "build_data",
         lambda t: data_input(t, both_splits("x.jpg", lambda p: write(p, jpeg_bytes()[: len(jpeg_bytes()) * 2 // 5]))),
         DataWarning, "Invalid JPEG data", check=skipped("x.jpg"), note="skipped, the rest trains"),
    Case("corrupt-jpeg", "JPEG header followed by random bytes", "build_data",
         lambda t: data_input(t, both_splits("x.jpg", lambda p: write(
             p, jpeg_bytes()[:200] + np.random.default_rng(1).bytes(4000)))),
         DataWarning, "Invalid JPEG data", check=skipped("x.jpg"), note="skipped, the rest trains"),
    Case("text-named-jpg", "a text file named x.jpg", "build_data",
         lambda t: data_input(t, both_splits("x.jpg", lambda p: write(p, b"<html>not an image</html>\n" * 20))),
         DataWarning, "Unknown image file format", check=skipped("x.jpg"), note="skipped, the rest trains"),
    Case("corrupt-with-on_corrupt=error", "a 0-byte x.jpg with data.on_corrupt=error", "build_data",
         lambda t: data_input(t, {"train/a/x.jpg": lambda p: write(p, b"")}, on_corrupt="error"),
         ValueError, "data.on_corrupt=skip"),
    Case("every-image-corrupt", "a folder of 0-byte .jpg files", "build_data",
         lambda t: {"data": data_cfg(all_empty(t)), "batch_size": 1}, ValueError,
         "none of the training images under"),
    Case("png-with-alpha", "RGBA PNG (alpha 100)", "build_data",
         lambda t: data_input(t, both_splits("x.png", lambda p: write(p, image=rgba(), fmt="PNG"))),
         None, check=colour_is("x.png", COLOUR), note="alpha dropped, right colour"),
    Case("cmyk-jpeg", "CMYK JPEG", "build_data",
         lambda t: data_input(t, both_splits("x.jpg", lambda p: write(p, image=solid().convert("CMYK"), fmt="JPEG",
                                                                           quality=95))),
         None, check=colour_is("x.jpg", COLOUR), note="right RGB colour"),
    Case("16-bit-png", "RGB PNG, 16 bits per channel", "build_data",
         lambda t: data_input(t, both_splits("x.png", lambda p: png16(p, tuple(c * 257 for c in COLOUR)))),
         None, check=colour_is("x.png", COLOUR), note="scaled to 8 bits, right colour"),
    Case("16-bit-grey-png", "greyscale PNG, 16 bits (I;16)", "build_data",
         lambda t: data_input(t, both_splits("x.png", lambda p: write(p, image=grey16(), fmt="PNG"))),
         None, check=colour_is("x.png", (200, 200, 200)), note="grey 200 (PIL would clip it to 255)"),
    Case("animated-gif", "2-frame GIF (first frame is used)", "build_data",
         lambda t: data_input(t, both_splits("x.gif", lambda p: solid().save(
             p, "GIF", save_all=True, append_images=[solid(colour=(0, 255, 0))]))),
         None, check=colour_is("x.gif", COLOUR), note="first frame's colour"),
    Case("greyscale-jpeg", "8-bit greyscale JPEG", "build_data",
         lambda t: data_input(t, both_splits("x.jpg", lambda p: write(p, image=solid().convert("L"), fmt="JPEG",
                                                                           quality=95))),
         None, check=colour_is("x.jpg", (GREY, GREY, GREY)), note="grey replicated to 3 channels"),
    Case("palette-png", "palette (P mode) PNG", "build_data",
         lambda t: data_input(t, both_splits("x.png", lambda p: write(p, image=solid().convert("P"), fmt="PNG"))),
         None, check=colour_is("x.png", COLOUR), note="palette colour"),
    Case("webp-and-bmp", "WebP and BMP files", "build_data",
         lambda t: data_input(t, {**both_splits("x.webp", lambda p: write(p, image=solid(), fmt="WEBP",
                                                                            lossless=True)),
                                  "valid/b/y.bmp": lambda p: write(p, image=solid(), fmt="BMP")}),
         None, check=all_of(colour_is("x.webp", COLOUR), colour_is("y.bmp", COLOUR)), note="right colours"),
    Case("tiny-image", "a 1x1 JPEG", "build_data",
         lambda t: data_input(t, both_splits("x.jpg", lambda p: write(p, image=solid((1, 1)), fmt="JPEG",
                                                                           quality=95))),
         None, check=colour_is("x.jpg", COLOUR, tol=6), note="upsampled, right colour"),
    Case("spaces-and-non-ascii-names", "class 'chat noir', file 'été 猫 #1 (copy).jpg'", "build_data",
         lambda t: data_input(t, {"train/chat noir/été 猫 #1 (copy).jpg": lambda p: write(p, image=solid(),
                                                                                        fmt="JPEG", quality=95),
                                  "valid/chat noir/ü ñ 日本.jpg": lambda p: write(p, image=solid(), fmt="JPEG",
                                                                               quality=95)}),
         None, check=all_of(classes_are("a", "b", "chat noir"), colour_is("ü ñ 日本.jpg", COLOUR)),
         note="class 'chat noir' kept, file decoded"),
    Case("batch-larger-than-dataset", "train.batch_size=64 for 4 training images", "build_data",
         lambda t: data_input(t, batch_size=64), ValueError, "fewer than one batch of 64"),
    Case("huge-10000x10000-jpeg", "a 10000x10000 JPEG (300 MB decoded)", "huge", lambda t: huge_input(t), None,
         check=lambda r, i: huge_check(r, i), slow=True,
         note="scan, a training epoch, validation; peak memory grows < 1200 MiB"),
    # ---- weight files
    Case("weights-for-another-arch", "a resnet18 .pth with model.arch=resnet34", "load_pretrained",
         lambda t: {"spec": str(torch_state_dict_file(t / "r18.pth")), "arch": "resnet34"},
         ConversionError, "set --arch resnet18 (model.arch=resnet18)"),
    Case("truncated-pth", "half of a torch.save zip .pth", "load_pretrained",
         lambda t: {"spec": str(truncate(torch_state_dict_file(t / "r18.pth"))), "arch": "resnet18"},
         TorchFileError, "damaged or truncated torch.save file"),
    Case("truncated-legacy-pth", "half of a legacy (non-zip) .pth", "load_pretrained",
         lambda t: {"spec": str(truncate(torch_state_dict_file(t / "r18.pth", legacy=True))), "arch": "resnet18"},
         TorchFileError, "truncated"),
    Case("truncated-safetensors", "half of a .safetensors file", "load_pretrained",
         lambda t: {"spec": str(truncate(safetensors_file(t / "r18.safetensors"))), "arch": "resnet18"},
         ValueError, "damaged or truncated safetensors file"),
    Case("pickle-runs-code", "a .pth pickle whose __reduce__ calls exec", "load_pretrained",
         lambda t: evil_pickle(t, zipped=False), UnsafePickleError, "refusing to unpickle the global '__builtin__.exec",
         check=no_sentinel, note="the payload's file is never written"),
    Case("pickle-runs-code-in-zip", "a torch.save archive holding an exec payload", "load_pretrained",
         lambda t: evil_pickle(t, zipped=True), UnsafePickleError, "refusing to unpickle the global '__builtin__.exec",
         check=no_sentinel, note="the payload's file is never written"),
    Case("image-named-pth", "a JPEG renamed weights.pth", "load_pretrained",
         lambda t: {"spec": str(write(t / "weights.pth", jpeg_bytes())), "arch": "resnet18"},
         ValueError, "unknown weights format"),
    Case("missing-weights-file", "model.pretrained=/missing/r18.pth", "load_pretrained",
         lambda t: {"spec": str(t / "missing" / "r18.pth"), "arch": "resnet18"}, FileNotFoundError,
         "weights file not found"),
    # ---- config and command line
    Case("unknown-field", "--config.train.foo=1", "cli", cli(*common.TINY_DEMO, "--config.train.foo=1"), 2,
         "unknown config field(s): --config.train.foo"),
    Case("misspelled-field", "--config.trian.lr=1e-3", "cli", cli(*common.TINY_DEMO, "--config.trian.lr=1e-3"), 2,
         "did you mean train.lr"),
    Case("wrong-type-int", "--config.train.batch_size=abc", "cli",
         cli(*common.TINY_DEMO, "--config.train.batch_size=abc"), 1, "--config.train.batch_size=abc"),
    Case("wrong-type-bool", "--config.data.augment=maybe", "cli",
         cli(*common.TINY_DEMO, "--config.data.augment=maybe"), 1, "Non-boolean argument"),
    Case("wrong-length-tuple", "--config.train.moms=0.9 (needs 3 numbers)", "cli",
         cli(*common.TINY_DEMO, "--config.train.moms=0.9"), 1, "train.moms=(0.9,) needs 3 numbers"),
    Case("wrong-choice", "--config.optim.name=adma", "cli", cli(*common.TINY_DEMO, "--config.optim.name=adma"), 1,
         "did you mean 'adam'"),
    Case("out-of-range", "--config.train.lr=-1", "cli", cli(*common.TINY_DEMO, "--config.train.lr=-1"), 1,
         "train.lr must be > 0"),
    Case("data-and-weights-missing", "data.path and model.pretrained both missing", "cli",
         cli("--config", "configs/hymenoptera.py", "--config.data.path=/nonexistent/hymenoptera",
             "--config.model.pretrained=/nonexistent/resnet34.pth"), 1,
         "also, the pretrained weights model.pretrained='/nonexistent/resnet34.pth' are not available",
         check=no_training, note="both problems in one run, no training"),
    Case("batch-larger-than-dataset-cli", "--config.train.batch_size=64 on 12 training images", "cli",
         cli(*common.TINY_DEMO, "--config.train.batch_size=64"), 1, "fewer than one batch of 64",
         check=no_training, slow=True, note="no training"),
    Case("pickle-runs-code-cli", "model.pretrained=<exec payload .pth>", "cli",
         cli_with(lambda t: ([*common.TINY_DEMO, f"--config.model.pretrained={t / 'evil.pth'}"],
                             evil_pickle(t, zipped=True))), 1, "refusing to unpickle",
         check=all_of(no_sentinel, no_training), slow=True, note="payload never runs, no training"),
    # ---- work dir
    Case("workdir-under-a-file", "--workdir=<a file>/run", "cli",
         cli_with(lambda t: ([*common.TINY_DEMO], {"workdir": write(t / "file", b"x") / "run"})), 1,
         "is not writable", check=no_training, note="no training"),
    Case("workdir-read-only", "--workdir in a chmod 555 folder", "prepare_workdir", read_only_workdir,
         SystemExit, "is not writable",
         skip=lambda: "running as root: chmod 555 does not stop root (see workdir-under-a-file)" if IS_ROOT else None),
    Case("disk-nearly-full", "10 MiB free on the work dir's disk", "prepare_workdir", disk_full, SystemExit,
         "only 10 MiB free"),
    Case("workdir-has-a-run", "a work dir that already holds checkpoints, no --resume", "prepare_workdir",
         existing_checkpoints, SystemExit, "pass --resume to continue it"),
    # ---- devices
    Case("batch-not-divisible-by-devices", "4 devices, train.batch_size=2", "multidevice", lambda t: {},
         "ValueError", "must be divisible by the number of devices (4", slow=True),
    Case("fewer-train-images-than-devices", "4 devices, 3 training images, batch 4", "multidevice",
         lambda t: {}, "ValueError", "fewer than one batch of 4", slow=True),
    Case("fewer-valid-images-than-devices", "4 devices, 1 validation image (padded, masked)", "multidevice",
         lambda t: {}, None, check=lambda r, i: multidevice_ok(r), slow=True,
         note="1 step; metrics count exactly 1 image"),
    # ---- divergence
    Case("nan-loss-first-epoch", "lr_max=1e30 from the start", "cli", cli_with(nan_in_first_epoch), 1,
         "loss is nan at step 2", check=said("no checkpoint was saved"), slow=True,
         note="says no checkpoint was saved"),
    Case("nan-loss-after-good-epoch", "resume a good run with lr_max=1e30", "cli", cli_with(nan_after_good_epoch),
         1, "loss is nan at step 5", check=kept_checkpoint_is_good(3), slow=True,
         note="checkpoint 3 kept, finite, resumes to the end"),
    Case("nan-validation-at-epoch-end", "lr_max=1e30 from step 2, one step per epoch", "cli",
         cli_with(nan_after_last_step_of_epoch), 1, "at step", check=kept_checkpoint_is_good(1), slow=True,
         note="the kept checkpoint has a finite valid_loss"),
]


def folder_one_class(t: Path) -> Path:
    for i in range(3):
        write(t / "one" / "a" / f"{i}.jpg", jpeg_bytes(seed=i))
    return t / "one"


def all_empty(t: Path) -> Path:
    for cls in "ab":
        for i in range(3):
            write(t / "empty" / cls / f"{i}.jpg", b"")
    return t / "empty"


def rgba():
    img = solid().convert("RGBA")
    img.putalpha(100)
    return img


def grey16():
    from PIL import Image

    return Image.new("I;16", (40, 30), 200 * 257)


def huge_input(t: Path) -> dict:
    from PIL import Image

    root = folder(t / "images")
    x = np.linspace(0, 255, 10000).astype(np.uint8)
    arr = np.empty((10000, 10000, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = x[None, :], x[:, None], 128
    Image.fromarray(arr).save(root / "train" / "a" / "huge.jpg", quality=80)
    del arr
    shutil.copy(root / "train" / "a" / "huge.jpg", root / "valid" / "a" / "huge.jpg")
    return {"root": root, "cache": t / "scan"}


def huge_check(r: dict, inp: dict) -> None:
    assert not r["corrupt"] and r["num_train"] == 5 and r["num_valid"] == 3 and r["finite"]
    assert r["train_batches"] == 5 and r["valid_images"] == 3
    assert any(p.endswith("huge.jpg") for p in r["valid_items"])
    # decoded once it is 300 MB of uint8; a float32 copy of it alone would be 1.2 GB
    grew = r["peak_mib"] - r["baseline_mib"]
    assert grew < 1200, f"peak memory grew by {grew:.0f} MiB for one 10000x10000 JPEG"


def multidevice_ok(r: dict) -> None:
    assert r["global_step"] == 1 and r["num_valid"] == 1 and not r["stopped_early"] and r["params_finite"]
    assert math.isfinite(r["valid_loss"]), r
    assert r["error_rate"] in (0.0, 1.0) and r["accuracy"] == 1.0 - r["error_rate"], r  # exactly one image counted


# ----------------------------------------------------------------------------------------------- runner
@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch, tmp_path_factory):
    """Scan caches, demo images and weight downloads stay out of ~/.cache."""
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path / "weights"))
    if not SHARED:
        SHARED.append(common.shared_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def multidevice_results(tmp_path_factory):
    shared = common.shared_dir(tmp_path_factory)
    work = tmp_path_factory.mktemp("multidevice")
    # 4 fake host devices: the CPU platform, pinned (on a GPU machine JAX would otherwise pick the GPU)
    env = common.cli_env(shared, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(common.ROOT / "tests" / "reliability" / "multidevice_cases.py"),
                        str(work), common.xla_dir(shared)], cwd=common.ROOT, capture_output=True, text=True,
                       env=env, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, common.tail(r.stdout + r.stderr)
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["devices"] == 4
    return out


def _call(case: Case, inp: dict, request, monkeypatch):
    if "patch" in inp:
        monkeypatch.setattr(*inp["patch"])
    if case.call == "build_data":
        from jaxtl.data import build_data

        return build_data(inp["data"], inp["batch_size"], 0)
    if case.call == "load_pretrained":
        from jaxtl.convert import load_pretrained

        return load_pretrained(inp["spec"], inp["arch"])
    if case.call == "prepare_workdir":
        from jaxtl.main import prepare_workdir

        return prepare_workdir(inp["workdir"], inp["resume"])
    if case.call == "cli":
        return common.run_cli(SHARED[0], *inp["args"], workdir=inp["workdir"])
    if case.call == "huge":
        r = subprocess.run([sys.executable, str(common.ROOT / "tests" / "reliability" / "huge_image.py"),
                            str(inp["root"]), str(inp["cache"])], cwd=common.ROOT, capture_output=True, text=True,
                           env=common.cli_env(SHARED[0]), timeout=600)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        assert r.returncode == 0 and lines, common.tail(r.stdout + r.stderr)
        return json.loads(lines[-1][len("RESULT "):])
    if case.call == "multidevice":
        return request.getfixturevalue("multidevice_results")[case.id]
    raise AssertionError(f"unknown call {case.call}")


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, tmp_path, request, monkeypatch):
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    inp = case.build(tmp_path)
    if case.call == "multidevice":
        result = _call(case, inp, request, monkeypatch)
        if case.expect is None:
            assert result.get("ok"), result
        else:
            assert result.get("error") == case.expect, result
            assert case.message in result["message"], result["message"]
        if case.check:
            case.check(result, inp)
        return
    if case.call == "cli":
        r = _call(case, inp, request, monkeypatch)
        text = r.stdout + r.stderr
        assert "Traceback" not in text, common.tail(text)
        assert r.returncode == case.expect, f"exit {r.returncode}:\n{common.tail(text)}"
        assert case.message in text, common.tail(text)
        if case.check:
            case.check(r, inp)
        return
    if case.expect is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataWarning)  # a success case must not warn either
            result = _call(case, inp, request, monkeypatch)
    elif issubclass(case.expect, Warning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _call(case, inp, request, monkeypatch)
        texts = [str(w.message) for w in caught if issubclass(w.category, case.expect)]
        assert any(case.message in t for t in texts), texts
    else:
        with pytest.raises(case.expect) as e:
            _call(case, inp, request, monkeypatch)
        assert case.message in str(e.value), str(e.value)
        result = e.value
    if case.check:
        case.check(result, inp)


def test_table_has_at_least_25_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25


def markdown_table() -> str:
    rows = ["| case | input | through | expected | message contains | also checked |", "|---|---|---|---|---|---|"]
    for c in CASES:
        expected = c.outcome + (" (known defect, xfail)" if c.xfail else "")
        msg = c.message.replace("|", "\\|")
        rows.append(f"| {c.id} | {c.input} | {c.call} | {expected} | {('`' + msg + '`') if msg else ''} | {c.note} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"{len(CASES)} cases\n")
    print(markdown_table())
