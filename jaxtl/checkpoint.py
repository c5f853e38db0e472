"""Checkpoints with orbax: the train state (params, batch_stats, opt_state, step, rng) plus JSON metadata.

Layout in the work dir::

    checkpoints/<global_step>/{state,meta}   latest ones (every epoch, and on a requested stop)
    best/<global_step>/{state,meta}          the best epoch by ``config.train.metric``

orbax writes each checkpoint into a temporary directory and renames it when complete, so a write interrupted
half-way leaves the previous checkpoint as the latest loadable one; old checkpoints are deleted only after the
new one is finalised. Saves are synchronous (the step buffers are donated, and a checkpoint per epoch is cheap
next to the epoch).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
VERSION = 1  # of the metadata the Learner writes (``Learner._meta``)


def _manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        directory.absolute(), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )


def abstract(tree: PyTree) -> PyTree:
    """Shape/dtype/sharding skeleton of a pytree of arrays (the restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Latest + best checkpoints of one run, keyed by the Learner's global step."""

    def __init__(self, workdir: str | Path, max_to_keep: int = 2) -> None:
        self.workdir = Path(workdir)
        self._latest = _manager(self.workdir / "checkpoints", max_to_keep)
        self._best = _manager(self.workdir / "best", 1)

    def _mgr(self, best: bool) -> ocp.CheckpointManager:
        return self._best if best else self._latest

    def save(self, step: int, state: PyTree, meta: dict[str, Any], *, best: bool = False) -> None:
        """Write ``state`` (a pytree of arrays, one replica) and ``meta`` (JSON-able) as checkpoint ``step``.

        Saving a step that already exists replaces it.
        """
        mgr = self._mgr(best)
        if step in mgr.all_steps():
            mgr.delete(step)
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)
        mgr.wait_until_finished()

    def latest_step(self, *, best: bool = False) -> int | None:
        mgr = self._mgr(best)
        mgr.reload()
        return mgr.latest_step()

    def all_steps(self, *, best: bool = False) -> list[int]:
        mgr = self._mgr(best)
        mgr.reload()
        return sorted(mgr.all_steps())

    def restore_meta(self, step: int | None = None, *, best: bool = False) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: the latest)."""
        step = self._resolve(step, best)
        out = self._mgr(best).restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore_state(self, target: PyTree | None, step: int | None = None, *, best: bool = False) -> PyTree:
        """The state of ``step`` (default latest) shaped like ``target`` (arrays or ``abstract(...)``; its
        shardings are used). ``target=None`` returns the raw saved tree (nested dicts of arrays) with the saved
        sharding, or on this process's first device when the saving devices do not exist here (a checkpoint of a
        run with another process or device count)."""
        step = self._resolve(step, best)
        if target is None:
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            restore = ocp.args.StandardRestore(None, fallback_sharding=local)
        else:
            restore = ocp.args.StandardRestore(abstract(target))
        out = self._mgr(best).restore(step, args=ocp.args.Composite(state=restore))
        return out["state"]

    def _resolve(self, step: int | None, best: bool) -> int:
        if step is None:
            step = self.latest_step(best=best)
        if step is None:
            where = self.workdir / ("best" if best else "checkpoints")
            raise FileNotFoundError(f"no checkpoint found in {where}; train first (train.checkpoint=True)")
        return step

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def load_variables(workdir: str | Path, *, best: bool = True) -> dict[str, PyTree]:
    """``{"params", "batch_stats"}`` from a run's best (or latest) checkpoint, as host arrays; e.g. for
    prediction. Falls back to the latest checkpoint when no best one exists."""
    ck = Checkpointer(workdir)
    try:
        use_best = best and ck.latest_step(best=True) is not None
        raw = ck.restore_state(None, best=use_best)
        return {"params": raw["params"], "batch_stats": raw["batch_stats"]}
    finally:
        ck.close()


# ------------------------------------------------------------------------------------ a run's metadata
def jsonable(x: Any) -> Any:
    """Metadata -> plain JSON types (NaN kept as a float: Python's json writes and reads it)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def check_resumable(meta: Mapping[str, Any], classes: list[str], workdir: Path | None) -> None:
    """The checkpoint ``meta`` can continue a run on data with ``classes``; else a ValueError saying why."""
    if meta.get("version") != VERSION:
        raise ValueError(f"checkpoint in {workdir} has format version {meta.get('version')}, expected {VERSION}")
    if meta["classes"] != classes:
        raise ValueError(f"the checkpoint in {workdir} was trained on classes {meta['classes']}, the data now has "
                         f"{classes}; resume with the same data (data.*) or a new work dir")


def check_same_phase(meta: Mapping[str, Any], phase: int, epochs: int, n_frozen_groups: int) -> None:
    """The recipe's phase ``phase`` is the one the checkpoint stopped in; else a ValueError saying why."""
    if meta["phase"] != phase:
        raise ValueError(f"the checkpoint is in phase {meta['phase']} but this recipe reached phase {phase} first; "
                         "resume with the same recipe and config")
    if meta["phase_epochs"] != epochs:
        raise ValueError(f"the checkpoint's phase {meta['phase']} runs {meta['phase_epochs']} epoch(s) but this "
                         f"call asks for {epochs}; resume with the same recipe and config")
    if meta["n_frozen_groups"] != n_frozen_groups:
        raise ValueError(f"the checkpoint froze {meta['n_frozen_groups']} layer group(s), this phase freezes "
                         f"{n_frozen_groups}; resume with the same recipe")
