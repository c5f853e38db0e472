"""Input-pipeline throughput vs the rate a ResNet train step consumes images, on this machine.

    python scripts/bench_input.py [--data DIR] [--size 224] [--batch 32] [--step-batch 16] [--json out.json]
    python scripts/bench_input.py --skip-step --cores 1,2 --json out.json   # host img/s per core

``--cores 1,2`` times the pipeline once per entry, each in a fresh process pinned to that many cores
(``os.sched_setaffinity``, before TensorFlow starts its thread pools) with ``data.num_workers`` = the core count,
and reports img/s, img/s per core and the bytes per image the host sends (every array of a batch: the uint8
images, labels and the batch transforms' draws). ``--cache`` sets ``data.cache``: the figure "epochs after the
first" is then the rate from the decoded images kept in memory.

Pipeline: ``jaxtl.data.build_data`` on ``../shared/data/hymenoptera_data`` (real photos with a GIF, a .jpeg
and a name with a space) when present, else on generated 500x375 JPEGs; the train batches of several
epochs (RandomResizedCrop + aug_transforms + normalisation, the full training path) are drawn as fast as
possible, after one warm-up batch. Step: a jitted ``value_and_grad`` + ``optax.adam`` update of
``jaxtl.models.create_model(arch)`` on random batches, after compilation. The two are timed separately; the
goal is ``pipeline_img_s >= 3 * step_img_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera_data"


def generated_jpegs(root: Path, classes: int = 2, per_class: int = 120, seed: int = 0) -> Path:
    """Photo-sized (500x375 or 375x500) smooth random JPEGs in ``root/<class>/``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
            low = rng.uniform(0, 255, size=(h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
            img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
            arr = np.asarray(img, np.float32) + rng.normal(0, 6, size=(h, w, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"img_{i:04d}.jpg", quality=90)
    return root


def bench_pipeline(data_dir: Path, size: int, batch: int, epochs: int, num_workers: int, cache: bool
                   ) -> dict[str, float]:
    from jaxtl.config import base_config
    from jaxtl.data import build_data

    cfg = base_config().data
    cfg.path, cfg.size, cfg.num_workers, cfg.cache = str(data_dir), size, num_workers, cache
    t0 = time.perf_counter()
    bundle = build_data(cfg, batch, seed=0)
    build_s = time.perf_counter() - t0
    it = bundle.train_batches(0)
    t0 = time.perf_counter()
    b0 = next(it)  # warm-up: tracing, thread start-up
    first_s = time.perf_counter() - t0
    bytes_per_image = sum(np.asarray(v).nbytes for v in b0.values()) / len(b0["label"])  # all the host sends
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += len(b["label"])
    n0, t1 = n, time.perf_counter()
    for e in range(1, epochs):  # the same run-long pipeline goes on (with data.cache: from memory)
        for b in bundle.train_batches(e):
            n += len(b["label"])
    t2 = time.perf_counter()
    train_s = t2 - t0
    t0 = time.perf_counter()
    nv = sum(int(b["mask"].sum()) for b in bundle.valid_batches())
    valid_s = time.perf_counter() - t0
    return {"pipeline_img_s": n / train_s, "pipeline_images": n, "valid_img_s": nv / valid_s,
            "later_epochs_img_s": (n - n0) / (t2 - t1) if n > n0 else float("nan"),
            "pipelines_built": bundle.pipelines_built, "cache": cache,
            "build_s": build_s, "first_batch_s": first_s, "num_train": bundle.num_train,
            "bytes_per_image": bytes_per_image, "image_dtype": str(b0["image"].dtype)}


def per_core(argv: list[str], cores: list[int]) -> list[dict]:
    """The pipeline benchmark once per core count, each in its own process pinned to that many cores."""
    import subprocess

    rows = []
    for c in cores:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "r.json"
            cmd = [sys.executable, __file__, *argv, "--skip-step", "--pin", str(c), "--num-workers", str(c),
                   "--json", str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            r = json.loads(out.read_text())
        r["img_s_per_core"] = r["pipeline_img_s"] / c
        rows.append(r)
        r["later_epochs_img_s_per_core"] = r["later_epochs_img_s"] / c
        print(f"{c} core(s){' data.cache' if r['cache'] else ''}: {r['pipeline_img_s']:.1f} img/s, "
              f"{r['img_s_per_core']:.1f} img/s per core (epochs after the first: "
              f"{r['later_epochs_img_s_per_core']:.1f}), {r['bytes_per_image']:.0f} bytes/image "
              f"({r['image_dtype']})", flush=True)
    return rows


def bench_step(arch: str, size: int, batch: int, iters: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxtl.models import create_model

    model = create_model(arch, num_classes=2)
    rng = jax.random.PRNGKey(0)
    x = jax.random.normal(rng, (batch, size, size, 3), jnp.float32)
    y = jnp.arange(batch, dtype=jnp.int32) % 2
    variables = model.init(rng, x[:1], train=False)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    def loss_fn(p, s, x, y, key):
        logits, upd = model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

    @jax.jit
    def step(p, s, o, x, y, key):
        (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x, y, key)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), s, o, loss

    t0 = time.perf_counter()
    params, stats, opt_state, loss = step(params, stats, opt_state, x, y, rng)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(iters):
        params, stats, opt_state, loss = step(params, stats, opt_state, x, y, jax.random.fold_in(rng, i))
    loss.block_until_ready()
    dt = time.perf_counter() - t0
    return {"step_img_s": batch * iters / dt, "step_s": dt / iters, "compile_s": compile_s,
            "jax_device": str(jax.devices()[0])}


def main(argv: list[str] | None = None) -> dict:
    from jaxtl.cpu_defaults import apply_cpu_defaults

    apply_cpu_defaults()  # as jaxtl.main, before JAX starts its backend
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help=f"image folder (default {DEFAULT_DATA} if present)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32, help="pipeline batch size")
    ap.add_argument("--epochs", type=int, default=3, help="pipeline epochs to time")
    ap.add_argument("--num-workers", type=int, default=-1, help="data.num_workers (-1 = AUTOTUNE)")
    ap.add_argument("--cache", action="store_true", help="data.cache (decoded images kept in memory)")
    ap.add_argument("--arch", default="resnet34")
    ap.add_argument("--step-batch", type=int, default=16)
    ap.add_argument("--step-iters", type=int, default=3)
    ap.add_argument("--skip-step", action="store_true", help="time the pipeline only")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--cores", default="", help="comma-separated core counts: per-core pipeline figures")
    ap.add_argument("--pin", type=int, default=0, help=argparse.SUPPRESS)  # worker: pin to this many cores
    args = ap.parse_args(argv)
    if args.pin:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.pin])
    if args.cores:
        keep = ["--size", str(args.size), "--batch", str(args.batch), "--epochs", str(args.epochs)]
        keep += (["--data", str(args.data)] if args.data else []) + (["--cache"] if args.cache else [])
        res = {"per_core": per_core(keep, [int(c) for c in args.cores.split(",")])}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        return res

    tmp = None
    data = args.data or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="jaxtl_bench_")
        data = generated_jpegs(Path(tmp.name) / "imgs")
        source = "generated 500x375 JPEGs"
    else:
        source = str(data)
    res: dict = {"data": source, "size": args.size, "batch": args.batch, "arch": args.arch,
                 "step_batch": args.step_batch, "cpu_count": os.cpu_count(), "machine": platform.processor()
                 or platform.machine()}
    res.update(bench_pipeline(data, args.size, args.batch, args.epochs, args.num_workers, args.cache))
    if not args.skip_step:
        res.update(bench_step(args.arch, args.size, args.step_batch, args.step_iters))
        res["ratio"] = res["pipeline_img_s"] / res["step_img_s"]
        res["goal_met"] = bool(res["ratio"] >= 3.0)
    if tmp is not None:
        tmp.cleanup()

    rows = [("data", res["data"]), ("image size", f"{args.size} px"),
            ("pipeline (train, augmented)", f"{res['pipeline_img_s']:.1f} img/s  "
             f"({res['pipeline_images']} images, batch {args.batch})"),
            ("  epochs after the first", f"{res['later_epochs_img_s']:.1f} img/s  (data.cache={args.cache}; "
             f"{res['pipelines_built']} pipeline(s) built)"),
            ("pipeline (validation)", f"{res['valid_img_s']:.1f} img/s"),
            ("bytes sent per image", f"{res['bytes_per_image']:.0f} ({res['image_dtype']})"),
            ("build_data / first batch", f"{res['build_s']:.2f} s / {res['first_batch_s']:.2f} s")]
    if "step_img_s" in res:
        rows += [(f"{args.arch} train step", f"{res['step_img_s']:.1f} img/s  ({res['step_s']:.2f} s/step at "
                  f"batch {args.step_batch}, compile {res['compile_s']:.0f} s, {res['jax_device']})"),
                 ("ratio pipeline / step", f"{res['ratio']:.1f}x  (goal >= 3x: "
                  f"{'met' if res['goal_met'] else 'NOT met'})")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
