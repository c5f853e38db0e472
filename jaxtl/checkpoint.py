"""Checkpoints with orbax: the train state (params, batch_stats, opt_state, step, rng) plus JSON metadata.

Layout in the work dir::

    checkpoints/<global_step>/{state,meta[,metrics]}   every epoch, and on a requested stop

One orbax ``CheckpointManager`` keeps the latest ``max_to_keep`` checkpoints plus the best one (a
``LatestN`` + ``BestN`` preservation policy): every checkpoint carries the orbax metrics ``{"best": step}`` when
it was saved with ``best=True`` and ``{"best": -1}`` otherwise, so the newest best-marked one is the best by
``config.train.metric`` (the Learner decides, with fastai's strict-improvement rule). A new best is written once,
not once more as a copy.

Saves are asynchronous (orbax async checkpointing): ``save`` returns once the arrays are copied off the device
(orbax's synchronous device-to-host transfer, so the next train step may donate them), and the files are written
in a background thread while training goes on. Every read, ``wait()`` and ``close()`` first waits for writes in
flight; the Learner waits at the end of each fit. orbax writes each checkpoint into a temporary directory and
renames it when complete, so a write interrupted half-way leaves the previous checkpoint as the latest loadable
one; old checkpoints are deleted only after the new one is finalised.
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
BEST = "best"  # the orbax metrics key: a best checkpoint's step (the newest mark wins), -1 on the others


def _manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers
    keep = policies.AnyPreservationPolicy([
        policies.LatestN(max_to_keep),
        policies.BestN(get_metric_fn=lambda m: m[BEST], n=1, keep_checkpoints_without_metrics=False)])
    # best_fn only makes orbax write the metrics; which checkpoints stay is the preservation policy's decision
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True, preservation_policy=keep,
                                           best_fn=lambda m: m[BEST], best_mode="max")
    return ocp.CheckpointManager(
        directory.absolute(), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )


def abstract(tree: PyTree) -> PyTree:
    """Shape/dtype/sharding skeleton of a pytree of arrays (the restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """The latest ``max_to_keep`` checkpoints of one run plus its best one, keyed by the Learner's global step."""

    def __init__(self, workdir: str | Path, max_to_keep: int = 2) -> None:
        self.workdir = Path(workdir)
        self._mgr = _manager(self.workdir / "checkpoints", max_to_keep)

    def save(self, step: int, state: PyTree, meta: dict[str, Any], *, best: bool = False) -> None:
        """Start writing ``state`` (a pytree of arrays, one replica) and ``meta`` (JSON-able) as checkpoint ``step``;
        ``best``: it is also the run's best one (kept until a newer best). Returns before the files are written
        (``wait()``). Saving a step that already exists replaces it (keeping its best mark)."""
        mgr = self._mgr
        mgr.wait_until_finished()
        if step in mgr.all_steps():
            best = best or self._is_best_mark(step)
            mgr.delete(step)
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 metrics={BEST: int(step) if best else -1}, force=True)

    def wait(self) -> None:
        """Block until every checkpoint write in flight is on disk (re-raises a failed write's error)."""
        self._mgr.wait_until_finished()

    def _is_best_mark(self, step: int) -> bool:
        m = self._mgr.metrics(step)
        return isinstance(m, Mapping) and int(m.get(BEST, -1)) >= 0

    def latest_step(self, *, best: bool = False) -> int | None:
        """The newest checkpoint's step, or with ``best`` the best one's (None when there is none)."""
        steps = self.all_steps(best=best)
        return steps[-1] if steps else None

    def all_steps(self, *, best: bool = False) -> list[int]:
        """Steps of the kept checkpoints (``best``: ``[the best step]`` or ``[]``)."""
        self.wait()
        self._mgr.reload()
        steps = sorted(self._mgr.all_steps())
        if best:
            marked = [s for s in steps if self._is_best_mark(s)]
            return marked[-1:]
        return steps

    def restore_meta(self, step: int | None = None, *, best: bool = False) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: the latest, or the best)."""
        step = self._resolve(step, best)
        out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore_state(self, target: PyTree | None, step: int | None = None, *, best: bool = False) -> PyTree:
        """The state of ``step`` (default latest, or the best) shaped like ``target`` (arrays or
        ``abstract(...)``; its shardings are used). ``target=None`` returns the raw saved tree (nested dicts of
        arrays) with the saved sharding, or on this process's first device when the saving devices do not exist
        here (a checkpoint of a run with another process or device count)."""
        step = self._resolve(step, best)
        if target is None:
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            restore = ocp.args.StandardRestore(None, fallback_sharding=local)
        else:
            restore = ocp.args.StandardRestore(abstract(target))
        out = self._mgr.restore(step, args=ocp.args.Composite(state=restore))
        return out["state"]

    def _resolve(self, step: int | None, best: bool) -> int:
        if step is None:
            step = self.latest_step(best=best)
        else:
            self.wait()
        if step is None:
            what = "best checkpoint" if best else "checkpoint"
            raise FileNotFoundError(f"no {what} found in {self.workdir / 'checkpoints'}; train first "
                                    "(train.checkpoint=True)")
        return step

    def close(self) -> None:
        self._mgr.close()  # waits for writes in flight


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
