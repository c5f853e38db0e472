"""How much faster a linear-probe epoch is than a frozen-phase epoch (``train.recipe=linear_probe`` vs the frozen
phase of ``fine_tune``), measured in the same run.

    python scripts/bench_probe.py [--data ../shared/data/hymenoptera_data] [--arch resnet18] [--size 224]
                                  [--batch 32] [--epochs 3] [--json out.json]

Both runs are ``Learner.from_config`` + ``run_recipe`` on the same image folder, model, size and batch, with seeded
random weights (``model.pretrained=demo:<arch>``: the time does not depend on the values). Frozen:
``fine_tune(epochs=0, freeze_epochs=E)`` -- the head trains with the body frozen, the body's forward pass (and
BatchNorm statistics) in every step, on augmented images. Probe: ``linear_probe`` for E epochs -- the body once
over the training and validation images (the features), then E epochs of the head on them. Reported: the median
epoch after the first (which compiles), training alone and with its validation, their ratio, and the probe's
one-time feature pass. ``--data`` defaults to the shared hymenoptera photos, else generated demo images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "hymenoptera_data"


def run(recipe: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One recipe's epoch times (seconds): training, validation, and the probe's feature pass."""
    from jaxtl import probe
    from jaxtl.config import base_config, validate
    from jaxtl.learner import Learner, run_recipe

    c = base_config()
    if args.data:
        c.data.source, c.data.path = "folder", args.data
    else:
        c.data.source = "demo"
    c.data.size, c.model.arch, c.model.pretrained = args.size, args.arch, f"demo:{args.arch}"
    c.train.recipe, c.train.batch_size, c.train.checkpoint = recipe, args.batch, False
    if recipe == "fine_tune":
        c.train.epochs, c.train.freeze_epochs = 0, args.epochs
    else:
        c.train.epochs = args.epochs
    validate(c)
    extract = []
    feature_data = probe.feature_data

    def timed(learn: Any) -> Any:  # the probe's one-time pass over the images
        t0 = time.perf_counter()
        out = feature_data(learn)
        extract.append(time.perf_counter() - t0)
        return out

    probe.feature_data = timed
    try:
        learn = Learner.from_config(c, workdir)
        run_recipe(learn)
    finally:
        probe.feature_data = feature_data
    train = [float(r["seconds"]) for r in learn.history]
    valid = learn.timings["validate"] / max(len(train), 1)  # the probe's: on the features
    return {"epoch_train_s": train, "validate_s_per_epoch": valid, "feature_pass_s": sum(extract),
            "steady_train_s": statistics.median(train[1:] or train), "images": learn.data.num_train,
            "final_error_rate": learn.history[-1]["error_rate"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED) if SHARED.is_dir() else "",
                    help="image folder ('' = generated demo images)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/jaxtl_bench_probe"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch compiles)")
    from jaxtl.cpu_defaults import apply_cpu_defaults

    apply_cpu_defaults()  # as jaxtl.main, before JAX starts its backend
    import jax

    runs = {name: run(recipe, args, args.workdir / name)
            for name, recipe in (("frozen", "fine_tune"), ("probe", "linear_probe"))}
    fz, pr = runs["frozen"], runs["probe"]
    with_valid = {k: r["steady_train_s"] + r["validate_s_per_epoch"] for k, r in runs.items()}
    res = {"data": args.data or "demo", "arch": args.arch, "size": args.size, "batch": args.batch,
           "epochs": args.epochs, "device": str(jax.devices()[0]), "backend": jax.default_backend(), "runs": runs,
           "speedup_train": fz["steady_train_s"] / pr["steady_train_s"],
           "speedup_with_validation": with_valid["frozen"] / with_valid["probe"],
           "probe_total_s": pr["feature_pass_s"] + sum(pr["epoch_train_s"]) + pr["validate_s_per_epoch"] * args.epochs,
           "frozen_total_s": sum(fz["epoch_train_s"]) + fz["validate_s_per_epoch"] * args.epochs}
    print(f"{args.arch} {args.size} px, batch {args.batch}, {fz['images']} training images, {jax.default_backend()}:"
          f" median epoch after the first of {args.epochs}")
    print(f"{'':8}  {'train s':>9}  {'+ valid s':>9}  {'feature pass s':>14}")
    for k, r in runs.items():
        print(f"{k:8}  {r['steady_train_s']:9.3f}  {with_valid[k]:9.3f}  {r['feature_pass_s']:14.2f}")
    print(f"probe epoch {res['speedup_train']:.0f}x faster (training), {res['speedup_with_validation']:.0f}x with "
          f"validation; whole run {res['probe_total_s']:.1f} s vs {res['frozen_total_s']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
