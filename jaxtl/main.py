"""Command-line entry point::

    python -m jaxtl.main --config configs/pets.py [--config.<field>=<value> ...] [--workdir DIR] [--resume]

Loads the config (``ml_collections`` config file; every field in ``jaxtl/config.py`` can be overridden),
checks it and the work dir before any heavy work, builds a :class:`jaxtl.learner.Learner`, runs the
recipe (``train.recipe``) and leaves in the work dir: ``config.json``, ``train.log``, ``history.csv``,
TensorBoard events, checkpoints, and PNG plots (loss curves, confusion matrix, top losses, lr_find).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxtl import config as jconfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>/<date-time>).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its latest checkpoint.")

log = logging.getLogger("jaxtl")
MIN_FREE_BYTES = 256 * 2**20


def default_workdir(config_arg: str, when: time.struct_time | None = None) -> Path:
    stem = Path(config_arg.split(":")[0]).stem
    variant = config_arg.split(":")[1] if ":" in config_arg else ""
    stamp = time.strftime("%Y%m%d-%H%M%S", when or time.localtime())
    return Path("runs") / (stem + (f"-{variant}" if variant else "")) / stamp


def prepare_workdir(workdir: Path, resume: bool, need_bytes: int = MIN_FREE_BYTES) -> None:
    """Create and probe the work dir now, so a read-only or full disk fails before training, not after epoch 1."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe.{os.getpid()}"  # unique: several processes may share the dir
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: work dir {workdir} is not writable ({e.strerror}); "
                         "pass --workdir=<a writable folder>") from None
    free = shutil.disk_usage(workdir).free
    if free < need_bytes:
        raise SystemExit(f"error: only {free / 2**20:.0f} MiB free on the disk of work dir {workdir}; checkpoints need "
                         f"about {need_bytes / 2**20:.0f} MiB. Free some space or pass --workdir on another disk.")
    if not resume and (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise SystemExit(f"error: {workdir} already holds checkpoints of a run; pass --resume to continue it, "
                         "or choose a new --workdir.")


USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError, OSError)
_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """When this process started (``time.time()`` scale): from /proc on Linux, else when jaxtl.main was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # since boot
        boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])  # 10 ms resolution
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


def preflight_message(config, error: BaseException) -> str:
    """The error that stopped the start, plus whether the weights are available too, so an offline user learns
    everything that is missing (data *and* weights) from one run."""
    lines = [f"error: {error}"]
    spec = config.model.pretrained
    if spec and "pretrained" not in str(error) and "weights" not in str(error):
        from jaxtl.convert import load_pretrained

        try:
            load_pretrained(spec, config.model.arch, cache_dir=config.model.weights_dir or None)
        except USER_ERRORS as e2:
            lines.append(f"error: also, the pretrained weights model.pretrained={spec!r} are not available: {e2}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    del argv
    from jaxtl.cpu_defaults import apply_cpu_defaults

    apply_cpu_defaults()  # the process's edge: XLA CPU flags before JAX starts its backend (jaxtl/cpu_defaults.py)
    absl_logging.set_verbosity(absl_logging.WARNING)  # before JAX starts: no backend-probing INFO lines on the console
    config = _CONFIG.value
    try:
        jconfig.validate(config)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    from jaxtl import learner as jlearner
    from jaxtl import loop, parallel, run_setup

    # multi-process: asked for by train.distributed or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES; before any
    # other JAX call. Every process runs this same program; only process 0 writes the work dir's files
    # (checkpoints are written by all, coordinated by orbax), so --workdir must be on a shared file system.
    if parallel.distributed_requested(config.train.distributed):
        parallel.initialize_distributed()
    import jax
    import numpy as np

    is_main = jax.process_index() == 0

    when = time.localtime()
    if jax.process_count() > 1 and not _WORKDIR.value:  # every process must name the same dir: process 0's clock
        from jax.experimental import multihost_utils

        stamp = multihost_utils.broadcast_one_to_all(np.array(when[:6] + (0, 1, -1), np.int32))
        when = time.struct_time(tuple(int(v) for v in stamp))
    workdir = Path(_WORKDIR.value) if _WORKDIR.value else default_workdir(flags.FLAGS["config"].config_filename, when)
    prepare_workdir(workdir, _RESUME.value)
    run_setup.start_run(config, workdir)  # Learner.from_config repeats it (idempotent): cache, train.log, config
    if is_main:
        if jax.process_count() > 1:
            log.info("%d processes, %d devices", jax.process_count(), jax.device_count())
        print(f"jaxtl: work dir {workdir}", flush=True)
    else:
        absl_logging.set_verbosity(absl_logging.WARNING)  # as on process 0: no orbax INFO lines on the console

    try:
        learn = jlearner.Learner.from_config(config, workdir=workdir)
    except USER_ERRORS as e:
        raise SystemExit(preflight_message(config, e)) from None
    except KeyboardInterrupt:
        print("jaxtl: interrupted before training started; nothing to save", file=sys.stderr, flush=True)
        return 130

    t0 = time.time()
    signals: list[int] = []
    try:
        # jaxtl's one SIGINT / SIGTERM handler, for the whole recipe (every phase and the gaps between them): the
        # first signal stops after the current step with a checkpoint, a second SIGINT aborts
        with loop.stop_on_signals(learn.request_stop, signals):
            result = jlearner.run_recipe(learn, config, resume=_RESUME.value)
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"jaxtl: aborted; the last finished checkpoint in {workdir / 'checkpoints'} is kept",
              file=sys.stderr, flush=True)
        return 130
    if learn.stopped_early:
        if learn.stop_reason == "interrupted":
            code = 128 + (signals[0] if signals else signal.SIGINT)
            if config.train.recipe == "lr_find":
                print("jaxtl: lr_find interrupted; nothing saved", flush=True)
                return code
            print(f"jaxtl: stopped by {signal.Signals(code - 128).name}; checkpoint saved in "
                  f"{workdir / 'checkpoints'}. Resume with:\n"
                  f"  python -m jaxtl.main --config {flags.FLAGS['config'].config_filename} --workdir {workdir} "
                  "--resume", flush=True)
            return code
        print(f"jaxtl: stopped: {learn.stop_reason}\nThe last good checkpoint is kept in {workdir / 'checkpoints'}.",
              file=sys.stderr, flush=True)
        return 1
    learn.write_report()  # every process (gathers the validation predictions); process 0 writes
    if is_main:
        first = ""
        if learn.first_step_done_at is not None:  # start-up cost: imports, data, model, trace + compile/cache load
            since = learn.first_step_done_at - process_start_time()
            log.info("start-up: first training step done %.2f s after the process started", since)
            first = f" (first training step after {since:.1f}s)"
        print(f"jaxtl: done in {time.time() - t0:.0f}s{first}; {result}; outputs in {workdir}", flush=True)
    return 0


def run() -> None:
    try:
        jconfig.check_override_names(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(main)


if __name__ == "__main__":
    run()
