"""End-to-end wall time of ``fine_tune(1)``: input pipeline + compile + train + validation, with a breakdown.

    python scripts/bench_e2e.py [--data DIR] [--arch resnet34] [--size 224] [--batch 32] [--runs 2] [--json out.json]

Each run is a fresh Python process (as a user's second ``python -m jaxtl.main`` would be) that shares one new
persistent XLA compilation cache with the other runs, so run 1 compiles and run 2 loads the programs from the
cache. Per run it reports: data set-up (listing + corrupt scan + split), model set-up (init + weight
conversion), time to the end of the first training step ("time to train", from process start), and over the
fit: first steps of the phases (trace + compile or cache load), input waits, later steps, validation, total.
Data: ``../shared/data/hymenoptera_data`` when present, else generated JPEGs (``scripts/bench_input.py``).
Weights: ``demo:<arch>`` (seeded, written in torchvision names and converted) unless ``--pretrained`` is given.

``--config configs/demo.py`` times the real command instead: ``python -m jaxtl.main --config ...`` ``--runs``
times in fresh processes sharing one new XLA cache (``train.compile_cache_dir``); each run's "time to train" is
the ``start-up: first training step done`` line of its ``train.log`` (seconds from process start). With
``--fresh-caches`` run 1 also starts without jaxtl's other caches (demo images, demo/converted weights, corrupt
scan; ``JAXTL_CACHE_DIR`` / ``JAXTL_CACHE`` point at a new folder), as a user's very first run does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera_data"
T_START = time.time()


def child(args: argparse.Namespace) -> dict:
    """One timed fine_tune(1) in this process; returns the breakdown (seconds)."""
    import jax

    from jaxtl import train as jtrain
    from jaxtl.config import base_config
    from jaxtl.data import build_data
    from jaxtl.learner import Learner
    from jaxtl.models import create_model

    jtrain.enable_compilation_cache(args.xla_cache)
    t_import = time.time() - T_START
    c = base_config()
    c.data.source, c.data.path, c.data.size = "folder", args.data, args.size
    c.model.arch, c.model.pretrained = args.arch, args.pretrained or f"demo:{args.arch}"
    c.train.batch_size, c.train.checkpoint, c.train.compile_cache_dir = args.batch, False, args.xla_cache
    c.train.precision = args.precision
    t0 = time.time()
    data = build_data(c.data, c.train.batch_size, c.seed)
    t_data = time.time() - t0
    t0 = time.time()
    model = create_model(c.model.arch, len(data.classes), c.model.head, kernels=c.model.kernels)

    from jaxtl.convert import init_with_pretrained, load_pretrained

    pre = load_pretrained(c.model.pretrained, c.model.arch)
    variables = init_with_pretrained(model, jax.random.PRNGKey(0), pre, c.model.head, min(args.size, 64))
    learn = Learner(model, variables, data, c, workdir=None)
    learn.freeze()
    t_model = time.time() - t0
    t_fit0 = time.time()
    learn.fine_tune(1, base_lr=2e-3, freeze_epochs=1)
    t_fit = time.time() - t_fit0
    tm = learn.timings
    return {"imports_s": t_import, "data_setup_s": t_data, "model_setup_s": t_model,
            "time_to_train_s": learn.first_step_done_at - T_START, "fit_s": t_fit,
            "first_steps_s": tm["first_step"], "data_wait_s": tm["data_wait"], "steps_s": tm["step"],
            "validate_s": tm["validate"], "other_s": t_fit - sum(tm.values()),
            "train_images": data.num_train, "valid_images": data.num_valid,
            "final": {k: learn.history[-1][k] for k in ("train_loss", "valid_loss", "error_rate")},
            "total_s": time.time() - T_START}


def cli_runs(args: argparse.Namespace) -> list[dict]:
    """``python -m jaxtl.main --config args.config`` ``args.runs`` times; wall time and time to the first step."""
    tmp = Path(tempfile.mkdtemp(prefix="jaxtl_e2e_cli_"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.fresh_caches:
        env.update(JAXTL_CACHE_DIR=str(tmp / "cache"), JAXTL_CACHE=str(tmp / "cache" / "weights"))
    runs = []
    for i in range(args.runs):
        workdir = tmp / f"run{i + 1}"
        cmd = [sys.executable, "-m", "jaxtl.main", "--config", args.config, "--workdir", str(workdir),
               f"--config.train.compile_cache_dir={tmp / 'xla'}", *args.override]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.time() - t0
        log = (workdir / "train.log").read_text() if (workdir / "train.log").exists() else ""
        first = [float(x) for x in re.findall(r"first training step done ([0-9.]+) s", log)]
        if r.returncode != 0 or not first:
            print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"run {i + 1} failed (exit {r.returncode})")
        runs.append({"time_to_train_s": first[0], "total_s": wall})
        print(f"run {i + 1}: first training step after {first[0]:.2f}s, whole run {wall:.1f}s", file=sys.stderr,
              flush=True)
    return runs


def main() -> int:
    from jaxtl.cpu_defaults import apply_cpu_defaults

    apply_cpu_defaults()  # as jaxtl.main, before JAX starts its backend
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--arch", default="resnet34")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--pretrained", default="", help="registry name or file (default demo:<arch>)")
    ap.add_argument("--runs", type=int, default=2, help="fresh processes sharing one new XLA cache")
    ap.add_argument("--json", default="")
    ap.add_argument("--config", default="", help="time `python -m jaxtl.main --config CONFIG` instead")
    ap.add_argument("--fresh-caches", action="store_true", help="with --config: run 1 without jaxtl's caches")
    ap.add_argument("--override", action="append", default=[], help="with --config: extra --config.x=y flags")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--xla-cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    if args.config:
        runs = cli_runs(args)
        print(f"python -m jaxtl.main --config {args.config}: {len(runs)} runs, one new XLA cache"
              + (", run 1 without jaxtl's caches" if args.fresh_caches else ""))
        print(f"{'seconds':<16}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs))))
        for k in ("time_to_train_s", "total_s"):
            print(f"{k:<16}" + "".join(f"{r[k]:>10.2f}" for r in runs))
        out = {"config": args.config, "fresh_caches": args.fresh_caches, "runs": runs,
               "env": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "load": os.getloadavg()[0]}}
        if len(runs) > 1:
            out["time_to_train_speedup"] = runs[0]["time_to_train_s"] / runs[1]["time_to_train_s"]
            print(f"second run reaches training {out['time_to_train_speedup']:.2f}x sooner")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 0
    if not Path(args.data).is_dir():
        from bench_input import generated_jpegs  # noqa: E402 (scripts/ sibling)

        args.data = str(generated_jpegs(Path(tempfile.mkdtemp(prefix="jaxtl_e2e_")) / "data"))
    xla_cache = tempfile.mkdtemp(prefix="jaxtl_xla_")
    runs = []
    for i in range(args.runs):
        cmd = [sys.executable, __file__, "--child", "--data", args.data, "--arch", args.arch, "--size", str(args.size),
               "--batch", str(args.batch), "--precision", args.precision, "--pretrained", args.pretrained,
               "--xla-cache", xla_cache]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            print(r.stderr[-4000:], file=sys.stderr)
            return 1
        runs.append(json.loads(line[len("RESULT "):]))
        print(f"run {i + 1} done", file=sys.stderr, flush=True)
    keys = ["imports_s", "data_setup_s", "model_setup_s", "time_to_train_s", "first_steps_s", "data_wait_s",
            "steps_s", "validate_s", "other_s", "fit_s", "total_s"]
    print(f"fine_tune(1) end to end: {args.arch} {args.size}px batch {args.batch} {args.precision}, "
          f"{runs[0]['train_images']} train / {runs[0]['valid_images']} valid images ({args.data})")
    print(f"{'seconds':<16}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs))))
    for k in keys:
        print(f"{k:<16}" + "".join(f"{r[k]:>10.1f}" for r in runs))
    out = {"runs": runs, "arch": args.arch, "size": args.size, "batch": args.batch, "precision": args.precision,
           "data": args.data, "env": {"python": platform.python_version(), "cpus": os.cpu_count()}}
    if len(runs) > 1:
        out["time_to_train_speedup"] = runs[0]["time_to_train_s"] / runs[1]["time_to_train_s"]
        out["compile_speedup"] = runs[0]["first_steps_s"] / max(runs[1]["first_steps_s"], 1e-9)
        print(f"second run reaches training {out['time_to_train_speedup']:.2f}x sooner "
              f"(first steps incl. compile: {out['compile_speedup']:.2f}x faster)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
