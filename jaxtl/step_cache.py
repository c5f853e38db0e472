"""Compiled steps kept on disk between runs: the persistent cache for what XLA's cache does not cover.

JAX's persistent compilation cache skips XLA's compile on a second run, but every run still traces the step in
Python, lowers it to StableHLO and fingerprints the module to look the executable up: 1.7-2 s for the demo's
ResNet-18 train step on a 2-core CPU, against 0.36 s to load the same executable serialised with
``jax.experimental.serialize_executable``. Neither JAX nor Flax keeps traced programs across processes (the
``jax.export`` route still lowers and fingerprints the module), hence this wrapper.

:class:`StepCache` wraps a ``jax.jit`` step. The first call with a new argument signature loads the executable
an earlier run saved under the same key, or compiles it as usual (``jit.lower(*args).compile()``, which goes
through XLA's cache) and saves it. The key is a sha256 over everything the program depends on:

- ``description``: what the caller built the step from (the model's repr, the optimiser config, the schedule's
  parameters, the frozen groups, ...); the caller must put every Python value the step closes over in it;
- the call's argument signature: pytree structure, shape, dtype, weak type and sharding of every leaf;
- the source of every ``jaxtl/*.py`` file, the jax / jaxlib / flax / optax / numpy / ml_dtypes versions, JAX's
  trace-affecting config values, the ``XLA_*`` / ``JAX_*`` / ``JAXTL_*`` environment, and the devices.

Files live in ``<JAX compilation cache dir>/jaxtl_steps`` (JAX's own cache keeps its files at that folder's top
level, so its eviction never touches them). A file that cannot be read is recompiled and rewritten; a step that
cannot be serialised, or a folder that cannot be written, just runs uncached. A program that XLA's cache
supplied is not saved (in jaxlib 0.10 such a CPU executable serialises without its kernels), so a step whose
module XLA's cache already held gains nothing here until that entry is gone. Loading an executable runs its
code: the cache folder must be the user's own (the same holds for XLA's cache).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger("jaxtl.step_cache")
SUBDIR = "jaxtl_steps"
FORMAT = 2  # bump when the file layout below changes (2: files from XLA cache hits, which do not run, excluded)
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")


def default_directory() -> Path | None:
    """``<jax_compilation_cache_dir>/jaxtl_steps``, or None when JAX's persistent cache is off."""
    base = jax.config.jax_compilation_cache_dir
    return Path(base) / SUBDIR if base else None


@lru_cache(maxsize=1)
def _source_digest() -> str:
    """sha256 over the relative path and bytes of every ``.py`` file of the jaxtl package."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=1)  # installed versions do not change within a process; ~5 ms per lookup
def _versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _trace_config() -> list[str]:
    """JAX's config values that change what a trace produces (the ones ``jax.jit`` keys its own cache on)."""
    try:
        from jax._src import config as jax_config  # private: there is no public list of these

        names, values = jax_config.trace_context_names(), jax_config.trace_context()
        pairs = zip(names, values, strict=True)
    except Exception:  # noqa: BLE001  (API moved: fall back to the public flags that matter most here)
        pairs = ((n, getattr(jax.config, n)) for n in ("jax_enable_x64", "jax_default_matmul_precision",
                                                        "jax_numpy_rank_promotion", "jax_threefry_partitionable"))
    return [f"{n}={v!r}" for n, v in pairs if " at 0x" not in repr(v)]  # context-manager objects: no stable repr


def environment_key() -> dict[str, Any]:
    """Everything outside the step itself that its compiled program depends on."""
    devices = jax.devices()
    return {
        "format": FORMAT, "source": _source_digest(), "versions": _versions(), "trace_config": _trace_config(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("XLA_", "JAX_", "JAXTL_"))},
        "backend": [jax.default_backend(), devices[0].client.platform_version, jax.process_count()],
        "devices": [(d.id, d.device_kind, d.process_index) for d in devices],
    }


def defined_in_jaxtl(module: Any) -> bool:
    """True when ``module`` and every Flax module among its fields are jaxtl's own classes, whose code the
    source digest covers (a model class defined in a notebook could change without changing any key)."""
    import flax.linen as nn

    if not type(module).__module__.startswith("jaxtl."):
        return False
    for name in getattr(module, "__dataclass_fields__", {}):
        value = getattr(module, name, None) if name not in ("parent", "name") else None
        if isinstance(value, nn.Module) and not defined_in_jaxtl(value):
            return False
    return True


def _leaf_signature(x: Any) -> tuple[Any, ...]:
    if isinstance(x, jax.Array):
        return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), repr(x.sharding))
    return (type(x).__name__, repr(x))  # Python scalars and the like (none in jaxtl's steps)


def call_signature(args: tuple[Any, ...]) -> str:
    """Pytree structure and per-leaf shape / dtype / weak type / sharding of a call's arguments."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return repr(treedef) + "|" + repr([_leaf_signature(x) for x in leaves])


@contextmanager
def _persistent_cache_hits() -> Iterator[list[str]]:
    """Collect the ``/jax/compilation_cache/cache_hits`` events JAX records inside the block (public
    ``jax.monitoring`` listener API). Events from other threads land here too: that only makes us skip a save."""
    hits: list[str] = []

    def listener(event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        yield hits
    finally:
        jax.monitoring.unregister_event_listener(listener)


class StepCache:
    """``jitted(*args)`` with its compiled program loaded from / saved to ``directory`` between runs.

    ``name``: file-name prefix (``train``, ``eval``, ...). ``description``: JSON-able values that, with the
    argument signature, determine the program (see the module docstring). ``directory=None``: no disk cache
    (plain ``jax.jit`` behaviour, one compile per signature). ``stats`` counts ``loaded`` / ``compiled`` /
    ``saved`` programs; ``_cache_size()`` is the number of programs held, like ``jax.jit``'s.
    """

    def __init__(self, jitted: Any, name: str, description: Mapping[str, Any],
                 directory: str | os.PathLike | None) -> None:
        self.jitted, self.name = jitted, name
        self.directory = None if directory is None else Path(directory)
        self.description = json.dumps(description, sort_keys=True, default=repr)
        self._programs: dict[Any, Callable[..., Any]] = {}
        self.stats = {"loaded": 0, "compiled": 0, "saved": 0}

    def _cache_size(self) -> int:
        return len(self._programs)

    def __call__(self, *args: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        fast_key = (treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", None)) for x in leaves))
        program = self._programs.get(fast_key)
        if program is None:
            program = self._programs[fast_key] = self._program(args)
        return program(*args)

    # ---------------------------------------------------------------------------------------------------------
    def key(self, args: tuple[Any, ...]) -> str:
        """The sha256 (hex) naming this step's file for these arguments."""
        blob = json.dumps({"step": self.name, "description": self.description, "args": call_signature(args),
                           "environment": environment_key()}, sort_keys=True, default=repr)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, args: tuple[Any, ...]) -> Path | None:
        return None if self.directory is None else self.directory / f"{self.name}-{self.key(args)[:40]}.jaxexec"

    def _program(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        path = self.path(args)
        if path is not None and path.exists():
            try:
                compiled = self._load(path)
                self.stats["loaded"] += 1
                log.info("step cache: loaded %s", path)
                return compiled
            except Exception as e:  # noqa: BLE001  (truncated file, other jaxlib build, ...: recompile)
                log.warning("step cache: cannot load %s (%s: %s); compiling again", path, type(e).__name__, e)
        with _persistent_cache_hits() as hits:
            compiled = self.jitted.lower(*args).compile()
        self.stats["compiled"] += 1
        if path is not None and hits:
            # jaxlib 0.10's CPU executable loaded from XLA's cache serialises without its kernels: a later run
            # would load it and fail with "NOT_FOUND: Function ... not found". Keep only programs compiled here.
            log.info("step cache: %s came from XLA's persistent cache; not saved", self.name)
        elif path is not None:
            self._save(compiled, path)
        return compiled

    @staticmethod
    def _load(path: Path) -> Any:
        from jax.experimental import serialize_executable

        payload, in_tree, out_tree = pickle.loads(path.read_bytes())
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)

    def _save(self, compiled: Any, path: Path) -> None:
        from jax.experimental import serialize_executable

        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
        except Exception as e:  # noqa: BLE001  (e.g. a program with constants JAX cannot serialise yet)
            log.info("step cache: %s cannot be serialised (%s: %s); it runs uncached", self.name,
                     type(e).__name__, e)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, path)  # atomic: a concurrent or interrupted run never sees half a file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.stats["saved"] += 1
        except OSError as e:
            log.warning("step cache: cannot write %s (%s); the step runs uncached next time too", path, e)
