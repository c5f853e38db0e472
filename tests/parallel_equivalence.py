"""Run by tests/test_parallel.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4.

Trains a tiny ResNet-18 with the same data under single-device jit, 4-device sharded jit and 4-device pmap and
prints one JSON line (prefixed ``RESULT``) with what the test compares:

- ``update``: one unfrozen SGD step with lr 1 (the update is minus the gradient): per-mode max over leaves of
  ``max|u - u_single| / max|u_single|``, and the same for the BatchNorm running statistics;
- ``frozen``: losses over several Adam steps in fastai's frozen phase (head + BatchNorm train), and masked eval
  sums afterwards;
- ``dropout``: the same with head dropout 0.5 under jit (1 vs 4 devices draw the same masks);
- ``originals_deleted``: leaves of the caller's variables deleted by buffer donation (must be 0);
- ``cache_size``: compilations of the jitted step after all steps (must be 1).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl.cpu_defaults import apply_cpu_defaults  # noqa: E402
from jaxtl.groups import trainable_mask
from jaxtl.models import create_model
from jaxtl.parallel import DataParallel
from jaxtl.train import TrainState, make_eval_step, make_train_step

apply_cpu_defaults()  # as jaxtl.main: jaxtl's XLA CPU flags before JAX starts its backend

B, S, C, STEPS = 8, 32, 3, 4
MODES = (("jit", 1), ("jit", 4), ("pmap", 4))


def batches(n: int) -> list[dict[str, np.ndarray]]:
    rs = np.random.RandomState(0)
    return [{"image": rs.randn(B, S, S, 3).astype(np.float32), "label": rs.randint(0, C, B).astype(np.int32)}
            for _ in range(n)]


def run(mode: str, n_devices: int, *, dropout: float, n_frozen: int, tx_fn, steps: int) -> dict:
    par = DataParallel(mode, devices=jax.devices()[:n_devices])
    par.check_batch_size(B)
    model = create_model("resnet18", C, head_dropout=dropout, axis_name=par.model_axis_name)
    variables = create_model("resnet18", C).init(jax.random.PRNGKey(0), jnp.zeros((1, S, S, 3)), train=False)
    mask = trainable_mask(variables["params"], n_frozen, True)
    tx = optax.masked(tx_fn(), mask)
    state = par.put_state(TrainState.create(variables["params"], variables["batch_stats"], tx,
                                            jax.random.PRNGKey(1)))
    step = par.train_step(make_train_step(model, tx, mask, axis_name=par.model_axis_name))
    losses = []
    data = batches(steps + 1)
    for b in data[:steps]:
        state, m = step(state, par.put_batch(b))
        losses.append(par.scalar(m["loss"]))
    ev = par.eval_step(make_eval_step(model, axis_name=par.model_axis_name))
    vb = dict(data[-1], mask=np.array([True] * 6 + [False] * 2))
    sums = {k: par.scalar(v) for k, v in ev({"params": state.params, "batch_stats": state.batch_stats},
                                            par.put_batch(vb)).items()}
    host = par.to_host(state)
    return {
        "losses": losses, "sums": sums, "host": host, "init": variables,
        "cache_size": step._cache_size() if mode == "jit" else 1,
        "originals_deleted": sum(x.is_deleted() for x in jax.tree.leaves(variables)),
    }


def rel_diff(a, b) -> float:
    out = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = max(out, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
    return out


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    out: dict = {"update": {}, "frozen": {}, "dropout": {}, "originals_deleted": 0, "cache_size": []}
    ref = None
    for mode, n in MODES:
        r = run(mode, n, dropout=0.0, n_frozen=0, tx_fn=lambda: optax.sgd(1.0), steps=1)
        upd = jax.tree.map(lambda p1, p0: np.asarray(p1) - np.asarray(p0), r["host"].params, r["init"]["params"])
        if ref is None:
            ref = (upd, r["host"].batch_stats)
        out["update"][f"{mode}{n}"] = {"params": rel_diff(upd, ref[0]),
                                       "batch_stats": rel_diff(r["host"].batch_stats, ref[1]),
                                       "loss": r["losses"][0]}
        out["originals_deleted"] += r["originals_deleted"]
    for mode, n in MODES:
        r = run(mode, n, dropout=0.0, n_frozen=-1, tx_fn=lambda: optax.adamw(1e-3, eps=1e-5), steps=STEPS)
        out["frozen"][f"{mode}{n}"] = {"losses": r["losses"], "sums": r["sums"]}
        out["cache_size"].append(r["cache_size"])
    for mode, n in MODES[:2]:
        r = run(mode, n, dropout=0.5, n_frozen=-1, tx_fn=lambda: optax.adamw(1e-3, eps=1e-5), steps=STEPS)
        out["dropout"][f"{mode}{n}"] = {"losses": r["losses"]}
    try:
        DataParallel("jit").check_batch_size(6)
        out["bad_batch_error"] = None
    except ValueError as e:
        out["bad_batch_error"] = str(e)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
