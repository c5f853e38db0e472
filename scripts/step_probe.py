"""Two properties of the compiled model that a backend can break, checked on whatever JAX runs on (gpu_check.sh).

    python scripts/step_probe.py [--arch resnet50] [--size 224] [--batch 8] [--kernels auto] [--json out.json]

1. **Forward-mode AD through the model.** ``jax.jvp`` of the ResNet + fastai head (train mode: BatchNorm on batch
   statistics) along a random parameter tangent ``t``, checked against reverse mode with the transposition
   identity ``<u, J t> = <J^T u, t>`` (random ``u``; relative error < 1e-3 in float32 at
   ``jax.default_matmul_precision("highest")``). It fails where a kernel is a ``custom_vjp`` (the CPU set's max-pool
   and stride-2 conv: ``model.kernels="plain"`` is the forward-mode path there, see ``jaxtl/models/kernels.py``).
2. **No ``conditional`` in the compiled train step.** The CPU kernel set puts a ``lax.cond`` fusion barrier before
   every conv; on another backend (``kernels="auto"`` picks ``"plain"``) the step must contain none: a conditional
   is a kernel-launch boundary and a host-visible predicate on a GPU. Counted in the optimised HLO text.

The JSON has, per kernel set asked for: ``jvp`` (``ok``, both sides of the identity and their relative error, or the
error message) and ``conditionals`` (count of ``conditional`` instructions in the compiled unfrozen fastai-Adam step).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def _model(arch: str, kernels: str, num_classes: int = 10, **kw: Any) -> Any:
    from jaxtl.models import create_model

    return create_model(arch, num_classes, "fastai", kernels=kernels, **kw)


def jvp_check(arch: str, size: int, batch: int, kernels: str, tol: float = 1e-3) -> dict[str, Any]:
    """``jax.jvp`` of the train-mode forward along a random tangent, checked against reverse mode (float32)."""
    import jax
    import jax.numpy as jnp

    # no dropout (a fixed mask would be the same linear map in both; leaving it out keeps the two models identical)
    model = _model(arch, kernels, head_dropout=0.0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32))
    with jax.default_matmul_precision("highest"):
        variables = jax.jit(lambda k: model.init(k, x[:1], False))(jax.random.PRNGKey(0))
        params, stats = variables["params"], variables["batch_stats"]
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        tangent = treedef.unflatten([jax.random.normal(k, p.shape, p.dtype) * 0.01 for k, p in zip(keys, leaves,
                                                                                                    strict=True)])

        def f(p: Any) -> jax.Array:
            logits, _ = model.apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])
            return logits

        try:
            _, jvp_out = jax.jit(lambda p, t: jax.jvp(f, (p, ), (t, )))(params, tangent)
        except Exception as e:  # what a custom_vjp kernel raises under forward-mode AD
            return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        # the reference is reverse mode, through the transposition identity <u, J t> = <J^T u, t>: exact for the
        # piecewise-linear ReLU/max-pool network (a finite difference is not: at a 224-px ResNet's ReLU kinks its
        # error is O(eps), measured 2-70% here even in float64), and reverse mode is the path training uses
        u = jax.random.normal(jax.random.PRNGKey(3), jvp_out.shape, jvp_out.dtype)
        (jt_u,) = jax.jit(lambda p, u: jax.vjp(f, p)[1](u))(params, u)
        forward = float(jnp.vdot(u, jvp_out))
        reverse = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(jt_u), jax.tree.leaves(tangent),
                                                            strict=True)))
    err = abs(forward - reverse) / max(abs(forward), abs(reverse), 1e-12)
    return {"ok": bool(err < tol), "u_dot_jvp": forward, "vjp_dot_t": reverse, "rel_err": err, "tolerance": tol}


def conditionals_in_step(arch: str, size: int, batch: int, kernels: str) -> dict[str, Any]:
    """Compile jaxtl's unfrozen train step (fastai Adam) and count ``conditional`` instructions in its HLO."""
    import jax
    import jax.numpy as jnp

    from jaxtl import groups
    from jaxtl.config import base_config
    from jaxtl.optim import build_optimizer
    from jaxtl.parallel import DataParallel
    from jaxtl.train import TrainState, make_train_step

    dp = DataParallel("jit")
    model = _model(arch, kernels)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3), jnp.float32), False))(
        jax.random.PRNGKey(0))
    params = variables["params"]
    trainable = groups.trainable_mask(params, 0, True)
    tx = build_optimizer(base_config().optim, params, [1e-3] * groups.N_GROUPS, None, trainable)
    state = dp.put_state(TrainState.create(params, variables["batch_stats"], tx, jax.random.PRNGKey(1)))
    batch = dp.put_batch({"image": np.zeros((batch, size, size, 3), np.float32),
                          "label": np.zeros((batch,), np.int32)})
    t0 = time.perf_counter()
    text = dp.train_step(make_train_step(model, tx, trainable)).lower(state, batch).compile().as_text()
    n = len(re.findall(r"\bconditional\(", text))
    return {"conditionals": n, "compile_s": time.perf_counter() - t0, "hlo_chars": len(text)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kernels", default="auto", help="comma-separated model.kernels sets to probe")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import jax

    from jaxtl.models.kernels import kernel_set

    out: dict[str, Any] = {"backend": jax.default_backend(), "arch": args.arch, "size": args.size,
                           "batch": args.batch, "kernels": {}}
    for k in args.kernels.split(","):
        res = {"resolves_to": repr(kernel_set(k)),
               "jvp": jvp_check(args.arch, args.size, args.batch, k),
               **conditionals_in_step(args.arch, args.size, args.batch, k)}
        out["kernels"][k] = res
        print(f"kernels={k} ({res['resolves_to']}): jvp {res['jvp']}, conditionals in the step: "
              f"{res['conditionals']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
