"""Shared by the reliability tests (test_bad_inputs, test_interrupt, test_determinism): running the CLI in a
subprocess on a tiny demo config, a per-session cache for demo data / demo weights / XLA executables, and
comparisons of two runs' history.csv and model.safetensors.

Everything here is plain functions over paths; the tests own the assertions.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

# The README's demo job shrunk to seconds: 8 images per class at 32 px (12 train / 4 valid), batch 4 -> 3 steps per
# epoch; fine_tune = 1 frozen epoch + 1 unfrozen epoch = 6 optimiser steps, demo:resnet18 weights.
TINY_DEMO = ["--config", "configs/demo.py", "--config.data.demo_images=8", "--config.data.size=32",
             "--config.train.batch_size=4", "--config.train.epochs=1", "--config.train.freeze_epochs=1"]
TINY_STEPS = 6

_SHARED: dict[str, Path] = {}
_REFERENCE: dict[str, Path] = {}


def shared_dir(tmp_path_factory) -> Path:
    """One folder per pytest session for what every reliability test may reuse: demo images and weights
    (``JAXTL_CACHE``/``JAXTL_CACHE_DIR``) and the persistent XLA compilation cache (identical programs are
    compiled once per session instead of once per subprocess). ``$JAXTL_TEST_XLA_CACHE`` keeps the XLA cache
    across sessions."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _SHARED:
        d = tmp_path_factory.getbasetemp() / "reliability_shared"
        (d / "cache").mkdir(parents=True, exist_ok=True)
        _SHARED[key] = d
    return _SHARED[key]


def xla_dir(shared: Path) -> str:
    return os.environ.get("JAXTL_TEST_XLA_CACHE") or str(shared / "xla")


def cli_env(shared: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "JAXTL_CACHE": str(shared / "cache"), "JAXTL_CACHE_DIR": str(shared / "cache"),
           "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    if "XLA_FLAGS" not in extra:  # one CPU device unless a test asks for more
        env.pop("XLA_FLAGS", None)
    return env


def cli_args(shared: Path, *args: str, workdir: Path | None = None) -> list[str]:
    out = [sys.executable, "-m", "jaxtl.main", *args, f"--config.train.compile_cache_dir={xla_dir(shared)}"]
    if workdir is not None:
        out.append(f"--workdir={workdir}")
    return out


def run_cli(shared: Path, *args: str, workdir: Path | None = None, timeout: int = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m jaxtl.main ARGS`` (plus the shared compile cache) from the repository root."""
    return subprocess.run(cli_args(shared, *args, workdir=workdir), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env(shared))


def start_cli(shared: Path, *args: str, workdir: Path, log: Path) -> subprocess.Popen:
    """Like :func:`run_cli` but in the background with stdout+stderr going to the file ``log`` (for tests that send
    signals); read ``log`` after ``proc.wait()``."""
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cli_args(shared, *args, workdir=workdir), cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, text=True, env=cli_env(shared))


def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted :data:`TINY_DEMO` run (once per session): the baseline of the resume and determinism
    tests."""
    shared = shared_dir(tmp_path_factory)
    key = str(shared)
    if key not in _REFERENCE:
        work = shared / "reference_run"
        r = run_cli(shared, *TINY_DEMO, workdir=work)
        assert r.returncode == 0, f"reference run failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        _REFERENCE[key] = work
    return _REFERENCE[key]


def history_rows(workdir: Path) -> list[dict[str, str]]:
    """history.csv rows without the wall-clock ``time`` column (the only column allowed to differ)."""
    with open(Path(workdir) / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(f)]


def model_file(workdir: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a run's model.safetensors."""
    from safetensors import safe_open

    with safe_open(str(Path(workdir) / "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def differing_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Names whose tensors are not bit-identical (dtype, shape and bytes), plus names present in only one."""
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.shape == y.shape else -1
            bad.append(f"{k} (max |diff| {diff:.3g})")
    return bad


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]
