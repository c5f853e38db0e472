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

Several processes (``jax.distributed``, :func:`initialize_distributed`): every process runs the same program on its
own data shard; the mesh (jit) or the pmap spans the devices of all processes, so the steps' gradient and metric
reductions are global and the replicated state stays bitwise identical on every process. Host-side agreement
(stop requests, gathered predictions) goes through :func:`any_process` / :func:`allgather`.

One collective program at a time: a program with a cross-device collective (the train step's gradient
all-reduce, the eval step's metric sums, :func:`allgather`) is dispatched only when every earlier collective
program has finished or is an input of it. XLA:CPU runs each device's part of a program on its client thread
pool as soon as that part's inputs are ready; two *independent* collective programs in flight at once (e.g. the
eval steps of two validation batches) can each hold some of the threads while waiting in a rendezvous for the
parts that wait for a thread, and XLA aborts after 40 s ("Expected 4 threads to join the rendezvous, but only 2
of them arrived"). The train steps form a chain through the donated state; the Learner fetches each validation
batch's sums before dispatching the next and waits for the step in flight before a multi-process stop agreement.
Prediction programs have no collectives. Reading a replica never runs a program: on jax 0.10 a pmap output is a
``NamedSharding`` array and ``x[0]`` compiles to an all-reduce, so :meth:`DataParallel.get_state` and
:meth:`DataParallel.scalar` read the first local device's buffer instead (a pytree of ``x[0]`` calls was dozens
of independent all-reduce programs in flight beside the next train step).
"""

from __future__ import annotations

import os
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
            # pmap's ``devices`` must be the same list on every process; None maps over every device of every
            # process (each process feeding its local ones), so pmean/psum reduce across processes too
            self._pmap_devices = None if devices is None else list(devices)
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
        """The single-replica view of a replicated pytree (still jax arrays; cheap under jit). Under pmap: the first
        local device's replica, read from that device alone (``x[0]`` of a stacked array compiles to a cross-device
        all-reduce per leaf: see "One collective program at a time" above)."""
        if self.mode == "jit":
            return tree
        return jax.tree.map(lambda x: x.addressable_data(0)[0] if isinstance(x, jax.Array) else x[0], tree)

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
        """A replicated scalar (the loss) as a Python float (blocks until computed). A device-to-host copy of the
        first local replica: no program runs (``x[0]`` of a pmap output would be an all-reduce)."""
        return float(np.asarray(x.addressable_data(0)).reshape(-1)[0])

    def fetch(self, xs: list[jax.Array]) -> list[float]:
        """Replicated scalars (a run of step losses) as Python floats, in one ``jax.device_get`` of each one's first
        local replica (every copy is started before any is waited for; no program runs)."""
        return [float(np.asarray(v).reshape(-1)[0]) for v in jax.device_get([x.addressable_data(0) for x in xs])]

    # ---- step wrapping ---------------------------------------------------------------------------------
    def train_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compile ``fn(state, batch) -> (state, metrics)``; the input state's buffers are donated."""
        if self.mode == "jit":
            return jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding),
                           out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
        return jax.pmap(fn, axis_name=AXIS, devices=self._pmap_devices, donate_argnums=(0,))

    def eval_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compile ``fn(variables, batch) -> sums`` (replicated outputs)."""
        if self.mode == "jit":
            return jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding), out_shardings=self.replicated)
        return jax.pmap(fn, axis_name=AXIS, devices=self._pmap_devices)

    def predict_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compile ``fn(variables, images) -> per-example outputs`` (outputs sharded like the batch)."""
        if self.mode == "jit":
            return jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding),
                           out_shardings=self.batch_sharding)
        return jax.pmap(fn, axis_name=AXIS, devices=self._pmap_devices)

    def local_outputs(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded output, in order, as numpy."""
        if self.mode == "pmap":
            a = np.asarray(x)
            return a.reshape(-1, *a.shape[2:])
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards], axis=0)


# ---- multi-process --------------------------------------------------------------------------------------
# jaxtl reads the process count and id from these (JAX itself reads only JAX_COORDINATOR_ADDRESS and
# JAX_LOCAL_DEVICE_IDS); on SLURM, Open MPI and Cloud TPU pods JAX detects all of them when they are unset.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def distributed_requested(flag: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a run should call :func:`initialize_distributed`: ``config.train.distributed`` is True, or the
    environment names a coordinator or a process count (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES``).
    Cluster schedulers are not guessed from (a single ``python`` inside a SLURM allocation stays one process):
    on SLURM / a TPU pod set ``train.distributed=True`` and JAX auto-detects the rest."""
    env = os.environ if environ is None else environ
    return bool(flag) or bool(env.get(ENV_COORDINATOR)) or bool(env.get(ENV_NUM_PROCESSES))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, environ: Mapping[str, str] | None = None) -> None:
    """``jax.distributed.initialize`` for a multi-process run. Call before any other JAX call.

    Arguments left None come from ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``; whatever is still unset JAX auto-detects (SLURM, Open MPI, Cloud TPU). Cross-process
    collectives on the CPU backend use gloo (``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` overrides it). A second call
    is a no-op.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ if environ is None else environ

    def env_int(name: str) -> int | None:
        v = env.get(name, "").strip()
        if not v:
            return None
        try:
            return int(v)
        except ValueError:
            raise ValueError(f"environment variable {name}={v!r} must be an integer") from None

    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else env_int(ENV_PROCESS_ID)
    if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        # without cross-process collectives a CPU computation spanning processes fails; no effect on GPU/TPU
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def allgather(x: np.ndarray) -> np.ndarray:
    """Every process's ``x`` (same shape and dtype on all) stacked along a new leading process axis, on every
    process; ``x[None]`` with one process. A collective: all processes must call it."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (e.g. a stop request that reached one process only).
    A collective when there are several processes."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(allgather(np.asarray(bool(flag), np.int32)).any())
