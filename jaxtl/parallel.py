"""Data parallelism: a 1-D device mesh with sharded ``jax.jit`` (default) or ``jax.pmap``; multi-host glue.

``jit`` (``train.parallel="jit"``): one mesh axis ``"batch"`` over every device of every process. Batches are
global ``jax.Array`` s sharded along it, built from each process's local slice with
``jax.make_array_from_process_local_data``; the state is replicated. The loss is a mean over the global batch,
so XLA inserts the gradient all-reduce itself, and BatchNorm's batch moments are global means too.

``pmap`` (``train.parallel="pmap"``): the state carries a leading axis of local devices, batches are reshaped to
``(n_local_devices, B / n, ...)``, gradients and the loss are ``pmean``-ed over the axis ``"batch"`` in the
step, and BatchNorm syncs its moments through the model's ``axis_name="batch"``.

``DataParallel`` hides the difference from the Learner: ``put_state``, ``get_state``, ``put_batch``,
``train_step``, ``eval_step``, ``scalar``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"
MODES = ("jit", "pmap")
PyTree = Any


def make_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D mesh named ``"batch"`` over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    return Mesh(np.array(devices), (AXIS,))


class DataParallel:
    """Placement and step wrapping for one parallel mode (``"jit"`` or ``"pmap"``)."""

    def __init__(self, mode: str = "jit", devices: list[Any] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"config field train.parallel={mode!r} is not valid; choose one of {list(MODES)}")
        self.mode = mode
        if mode == "jit":
            self.mesh = make_mesh(devices)
            self.replicated = NamedSharding(self.mesh, P())
            self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
            self.local_devices = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        else:
            self.local_devices = list(jax.local_devices()) if devices is None else list(devices)
            self.mesh = make_mesh(self.local_devices)
            self._stacked = NamedSharding(self.mesh, P(AXIS))

    @property
    def n_devices(self) -> int:
        """Devices one global batch is split over (all processes)."""
        if self.mode == "jit":
            return int(self.mesh.devices.size)
        return len(self.local_devices) * jax.process_count()

    @property
    def n_local(self) -> int:
        return len(self.local_devices)

    @property
    def model_axis_name(self) -> str | None:
        """The ``axis_name`` the model's BatchNorm needs: ``"batch"`` under pmap, None under jit."""
        return AXIS if self.mode == "pmap" else None

    def check_batch_size(self, global_batch: int, what: str = "train.batch_size") -> None:
        """Raise a ValueError naming the field when ``global_batch`` does not split evenly over devices."""
        n, p = self.n_devices, jax.process_count()
        if global_batch % n or global_batch % p:
            raise ValueError(
                f"config field {what}={global_batch} must be divisible by the number of devices ({n}, over "
                f"{p} process(es)); use e.g. --config.{what}={-(-global_batch // n) * n}")

    # ---- placement -------------------------------------------------------------------------------------
    def put_state(self, tree: PyTree) -> PyTree:
        """Replicate a host or device pytree onto every device, always as fresh buffers (the train step donates
        its state, which must never delete the caller's arrays)."""
        if self.mode == "jit":
            # device_put may reuse a source buffer as one of the replicas (even with may_alias=False when
            # the device set changes), so copy device arrays first
            tree = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)
            return jax.device_put(tree, self.replicated)
        n = self.n_local
        return jax.tree.map(lambda x: jax.device_put(jnp.stack([jnp.asarray(x)] * n), self._stacked), tree)

    def get_state(self, tree: PyTree) -> PyTree:
        """The single-replica view of a replicated pytree (still jax arrays; cheap under jit)."""
        if self.mode == "jit":
            return tree
        return jax.tree.map(lambda x: x[0], tree)

    def to_host(self, tree: PyTree) -> PyTree:
        """NumPy copy of one replica (works for replicated arrays that span processes)."""
        tree = self.get_state(tree)
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Process-local numpy batch -> device arrays laid out for the step."""
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if v.shape[0] % self.n_local:
                raise ValueError(f"a batch of {v.shape[0]} examples on this process cannot be split over its "
                                 f"{self.n_local} devices; make train.batch_size divisible by {self.n_devices}")
            if self.mode == "jit":
                out[k] = jax.make_array_from_process_local_data(self.batch_sharding, v)
            else:
                out[k] = jax.device_put(v.reshape(self.n_local, -1, *v.shape[1:]), self._stacked)
        return out

    def scalar(self, x: jax.Array) -> float:
        """A replicated scalar (the loss) as a Python float (blocks until computed)."""
        if self.mode == "pmap":
            x = x[0]
        return float(np.asarray(x.addressable_data(0)))

    # ---- step wrapping ---------------------------------------------------------------------------------
    def train_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compile ``fn(state, batch) -> (state, metrics)``; the input state's buffers are donated."""
        if self.mode == "jit":
            return jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding),
                           out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
        return jax.pmap(fn, axis_name=AXIS, devices=self.local_devices, donate_argnums=(0,))

    def eval_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compile ``fn(variables, batch) -> sums`` (replicated outputs)."""
        if self.mode == "jit":
            return jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding), out_shardings=self.replicated)
        return jax.pmap(fn, axis_name=AXIS, devices=self.local_devices)

    def predict_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compile ``fn(variables, images) -> per-example outputs`` (outputs sharded like the batch)."""
        if self.mode == "jit":
            return jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding),
                           out_shardings=self.batch_sharding)
        return jax.pmap(fn, axis_name=AXIS, devices=self.local_devices)

    def local_outputs(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded output, in order, as numpy."""
        if self.mode == "pmap":
            a = np.asarray(x)
            return a.reshape(-1, *a.shape[2:])
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards], axis=0)


def initialize_distributed() -> None:
    """``jax.distributed.initialize()`` for multi-host runs (coordinator, process count and id from the
    environment / cluster auto-detection). Call before any other JAX call."""
    jax.distributed.initialize()
