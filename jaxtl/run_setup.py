"""What every run sets up before it builds data and model, whether it starts from ``jaxtl.main`` or from
``Learner.from_config`` in a notebook: JAX's persistent compilation cache (``train.compile_cache_dir``) and, with a
work dir, ``train.log`` (process 0), ``config.json`` and the config's log line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import ml_collections
from absl import logging as absl_logging

from jaxtl.train import enable_compilation_cache

log = logging.getLogger("jaxtl")


def setup_logging(workdir: Path) -> None:
    """jaxtl's log records (INFO and up) to ``workdir/train.log``; once per file however often it is called."""
    path = (Path(workdir) / "train.log").absolute()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in log.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the console gets the epoch table; the details go to train.log
    absl_logging.set_verbosity(absl_logging.WARNING)


def start_run(config: ml_collections.ConfigDict, workdir: str | Path | None) -> Path:
    """Enable the compilation cache; with a work dir, process 0 also logs to ``train.log`` and writes
    ``config.json``. Returns the compilation cache directory. ``train.distributed`` needs JAX's distributed
    runtime started before JAX's first computation, as ``jaxtl.main`` does; here it can only be checked."""
    if bool(config.train.distributed) and not jax.distributed.is_initialized():
        raise ValueError("config field train.distributed=True: JAX's distributed runtime is not initialised. "
                         "jaxtl.main starts it; in a notebook call jaxtl.parallel.initialize_distributed() in the "
                         "first cell, before any JAX computation")
    cache = enable_compilation_cache(str(config.train.compile_cache_dir))
    if workdir is not None and jax.process_index() == 0:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        setup_logging(workdir)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        log.info("config: %s", json.dumps(config.to_dict(), default=str))
    return cache
