"""Run by tests/test_learner.py in a subprocess with 4 CPU devices: the Learner end to end under sharded jit
and under pmap: an uninterrupted fit, the same fit stopped by max_steps and resumed (bit-equal final state),
validate, predict, lr_find. Prints ``RESULT {json}``."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import TinyBundle  # noqa: E402

from jaxtl.config import base_config  # noqa: E402
from jaxtl.cpu_defaults import apply_cpu_defaults  # noqa: E402
from jaxtl.learner import Learner  # noqa: E402
from jaxtl.models import create_model  # noqa: E402

apply_cpu_defaults()  # as jaxtl.main: jaxtl's XLA CPU flags before JAX starts its backend


def main() -> None:
    assert jax.device_count() == 4
    from jaxtl.train import enable_compilation_cache

    model = create_model("resnet18", 3)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        enable_compilation_cache(str(Path(tmp) / "xla"))
        for mode in ("jit", "pmap"):
            cfg = base_config()
            cfg.model.arch, cfg.train.batch_size, cfg.train.parallel = "resnet18", 8, mode
            data = TinyBundle(n_train=24, n_valid=10, batch_size=8)  # 3 steps per epoch, 2 per device
            ref = Learner(model, v, data, cfg, Path(tmp) / mode / "ref")
            ref.fit_one_cycle(2, 1e-3)
            cfg.train.max_steps = 4
            a = Learner(model, v, data, cfg, Path(tmp) / mode / "run")
            a.fit_one_cycle(2, 1e-3)  # stops after 4 of 6 steps, mid-epoch
            cfg.train.max_steps = 0
            b = Learner(model, v, data, cfg, Path(tmp) / mode / "run")
            b.fit_one_cycle(2, 1e-3, resume=True)
            same = all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in
                       zip(jax.tree.leaves(ref.par.to_host(ref.state)), jax.tree.leaves(b.par.to_host(b.state)),
                           strict=True))
            res = b.validate()
            probs = b.predict(data.xv[:5])
            lf = b.lr_find(num_it=6)
            out[mode] = {
                "steps": [ref.global_step, a.global_step, b.global_step], "resume_bit_equal": same,
                "valid_loss": [ref.history[-1]["valid_loss"], res["valid_loss"]],
                "probs_shape": list(probs.shape), "probs_sum_err": float(np.abs(probs.sum(-1) - 1).max()),
                "lr_find_steps": len(lf.lrs), "stopped": [a.stopped_early, b.stopped_early],
            }
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
