"""Run with 4 host CPU devices: validate() many times over many validation batches, under sharded jit and pmap.

Each validation batch is one program with a cross-device all-reduce (the metric sums). Before the fix they were
all dispatched back to back, so several such independent programs were in flight at once and XLA:CPU's client
thread pool could start partitions of batch k+1 while partitions of batch k still waited for a thread: the
all-reduce rendezvous of batch k then never completed (XLA aborts after 40 s). Prints ``OK <seconds>``.
Usage: python validate_multidevice.py [rounds]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tiny_data import TinyBundle  # noqa: E402

from jaxtl.config import base_config  # noqa: E402
from jaxtl.cpu_defaults import apply_cpu_defaults  # noqa: E402
from jaxtl.learner import Learner  # noqa: E402
from jaxtl.models import create_model  # noqa: E402

apply_cpu_defaults()  # as jaxtl.main: jaxtl's XLA CPU flags before JAX starts its backend


def main(rounds: int) -> None:
    assert jax.device_count() == 4, jax.devices()
    model = create_model("resnet18", 3)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3)), train=False))(jax.random.PRNGKey(0))
    data = TinyBundle(n_train=8, n_valid=96, batch_size=8, size=16)  # 12 validation batches
    t = time.time()
    for mode in ("jit", "pmap"):
        cfg = base_config()
        cfg.model.arch, cfg.train.batch_size, cfg.train.parallel = "resnet18", 8, mode
        learn = Learner(model, v, data, cfg)
        first = learn.validate()
        for _ in range(rounds):
            assert learn.validate() == first
        print(f"{mode}: {rounds + 1} validations of {-(-data.num_valid // 8)} batches", flush=True)
    print(f"OK {time.time() - t:.1f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
