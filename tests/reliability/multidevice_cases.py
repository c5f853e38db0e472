"""Run by tests/test_bad_inputs.py in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``:
tiny datasets on 4 CPU devices through ``Learner.from_config`` (the CLI's path). Prints ``RESULT {json}`` with one
entry per case: ``{"error": type, "message": str}`` or ``{"ok": true, ...}``.

Usage: python tests/reliability/multidevice_cases.py WORK_DIR XLA_CACHE_DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
from PIL import Image

from jaxtl.cpu_defaults import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()  # as jaxtl.main: jaxtl's XLA CPU flags before JAX starts its backend


def image_folder(root: Path, train: dict[str, int], valid: dict[str, int]) -> Path:
    for split, counts in (("train", train), ("valid", valid)):
        for k, (cls, n) in enumerate(sorted(counts.items())):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = (200, 40 + 30 * i, 90) if k == 0 else (30, 160, 40 + 30 * i)
                Image.new("RGB", (40, 36), colour).save(root / split / cls / f"{i}.jpg")
    return root


def config(path: Path, batch_size: int):
    from jaxtl.config import base_config

    c = base_config()
    c.data.path, c.data.size, c.data.augment = str(path), 32, False
    c.model.arch, c.model.pretrained = "resnet18", ""
    c.train.recipe, c.train.epochs, c.train.lr, c.train.batch_size = "one_cycle", 1, 1e-3, batch_size
    return c


def attempt(fn) -> dict:
    try:
        return {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - the test checks the type and message
        return {"error": type(e).__name__, "message": str(e)}


def main() -> None:
    work, xla = Path(sys.argv[1]), sys.argv[2]
    from jaxtl.learner import Learner, run_recipe
    from jaxtl.train import enable_compilation_cache

    enable_compilation_cache(xla)
    out = {"devices": jax.device_count()}
    # batch 2 cannot be split over 4 devices
    small = image_folder(work / "two_per_class", {"a": 2, "b": 2}, {"a": 1})
    out["batch-not-divisible-by-devices"] = attempt(lambda: Learner.from_config(config(small, 2)) and {})
    # 3 training images: fewer than one batch of 4 (= one image per device)
    three = image_folder(work / "three_images", {"a": 2, "b": 1}, {"a": 1, "b": 1})
    out["fewer-train-images-than-devices"] = attempt(lambda: Learner.from_config(config(three, 4)) and {})

    # 4 training images (one step of one image per device), 1 validation image for 4 devices: the validation
    # batch is padded and masked, so the metrics count exactly that one image
    def train_one_step() -> dict:
        learn = Learner.from_config(config(small, 4), workdir=work / "run")
        run_recipe(learn)
        row = learn.history[-1]
        finite = all(math.isfinite(float(x)) for leaf in jax.tree.leaves(learn.variables)
                     for x in jax.device_get(leaf).ravel()[:1000])
        return {"global_step": learn.global_step, "valid_loss": row["valid_loss"], "error_rate": row["error_rate"],
                "accuracy": row["accuracy"], "num_valid": learn.data.num_valid, "params_finite": finite,
                "stopped_early": learn.stopped_early}

    out["fewer-valid-images-than-devices"] = attempt(train_one_step)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
