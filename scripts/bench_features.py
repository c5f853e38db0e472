"""What the fine-tuning features cost per train step: jaxtl's step with each feature on vs the plain step.

    python scripts/bench_features.py [--arch resnet18] [--size 128] [--batch 32] [--steps 3] [--rounds 5]
                                     [--json out.json]

Every variant is ``jaxtl.train.make_train_step`` (unfrozen, Adam, float32 on the CPU / the backend's "auto"
precision elsewhere) on the same random batch, jitted with the state donated; after compiling, the variants run in
interleaved rounds (``--steps`` steps each per round, blocked on the result), so machine noise hits them alike.
Reported per variant: the median step time over the rounds and its cost relative to the plain step measured in the
same run. The issue's budgets: label smoothing + MixUp / CutMix <= 3% of the step, EMA <= 5%.
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

# variant -> jaxtl.mix.Regularise fields (train.label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch)
# and "ema_decay" (train.ema_decay: jaxtl.ema in the step), "accum_steps" (optax.MultiSteps; timed per batch)
VARIANTS: dict[str, dict[str, float]] = {
    "plain": {},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "MixUp 0.4 + LS": {"label_smoothing": 0.1, "mixup_alpha": 0.4},
    "CutMix 1.0 + LS": {"label_smoothing": 0.1, "cutmix_alpha": 1.0},
    "MixUp/CutMix switch + LS": {"label_smoothing": 0.1, "mixup_alpha": 0.4, "cutmix_alpha": 1.0},
    "EMA 0.999": {"ema_decay": 0.999},
    "accumulation 4 (per batch)": {"accum_steps": 4},
}


def build(arch: str, size: int, batch: int, classes: int, fields: dict[str, float]) -> tuple[Any, Any, Any]:
    """(jitted step, state, batch) of one variant."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxtl import ema
    from jaxtl.mix import Regularise
    from jaxtl.models import create_model
    from jaxtl.train import TrainState, compute_dtype, make_train_step

    model = create_model(arch, classes, "fastai", dtype=compute_dtype("auto"))
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
    mask = jax.tree.map(lambda _: True, variables["params"])
    fields = dict(fields)
    k = int(fields.pop("accum_steps", 1))
    tx = optax.adam(1e-4) if k == 1 else optax.MultiSteps(optax.adam(1e-4), k).gradient_transformation()
    state = TrainState.create(variables["params"], variables["batch_stats"], tx, jax.random.PRNGKey(1))
    average = ema.Ema(fields.pop("ema_decay")) if "ema_decay" in fields else None
    if average is not None:
        state = state.replace(ema=ema.start(variables))
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, classes, batch), jnp.int32)}
    step = jax.jit(make_train_step(model, tx, mask, regularise=Regularise(**fields), ema=average, accum_steps=k),
                   donate_argnums=0)
    return step, state, data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from jaxtl.cpu_defaults import apply_cpu_defaults

    apply_cpu_defaults()  # as jaxtl.main, before JAX starts its backend
    import jax

    runs = {}
    for name, fields in VARIANTS.items():
        step, state, data = build(args.arch, args.size, args.batch, args.classes, fields)
        t0 = time.perf_counter()
        state, out = step(state, data)
        jax.block_until_ready(out["loss"])
        runs[name] = {"step": step, "state": state, "data": data, "compile_s": time.perf_counter() - t0, "t": []}
    for _ in range(args.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r["state"], out = r["step"](r["state"], r["data"])
            jax.block_until_ready(out["loss"])
            r["t"].append((time.perf_counter() - t0) / args.steps)
    plain = statistics.median(runs["plain"]["t"])
    rows = []
    for name, r in runs.items():
        med = statistics.median(r["t"])
        rows.append({"variant": name, "fields": VARIANTS[name], "step_s_median": med, "step_s_all": r["t"],
                     "cost_vs_plain": med / plain - 1.0, "compile_s": r["compile_s"]})
    res = {"arch": args.arch, "size": args.size, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
           "device": str(jax.devices()[0]), "backend": jax.default_backend(), "rows": rows}
    width = max(len(r["variant"]) for r in rows)
    print(f"{args.arch} {args.size} px, batch {args.batch}, {jax.default_backend()}: median of {args.rounds} rounds "
          f"x {args.steps} steps")
    for r in rows:
        print(f"{r['variant']:<{width}}  {1e3 * r['step_s_median']:9.1f} ms/step  {100 * r['cost_vs_plain']:+6.1f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
