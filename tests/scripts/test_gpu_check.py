"""scripts/gpu_check.sh end to end on the CPU (``--cpu-dry-run``: small shapes), in a Python that sees no
TensorFlow -- as on the GPU machine (issue: accelerators, point 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_writes_every_part(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=str(ROOT / "tests" / "no_tensorflow"))
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry-run"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["cpu_dry_run"] is True
    assert set(out["parts"]) == {"devices", "tests", "bench_train", "step_probe"}
    assert all(p["exit"] == 0 for p in out["parts"].values()), out["parts"]
    assert out["devices"]["backend"] == "cpu"
    t = out["tests"]
    assert t["tests"] > 10 and t["failures"] == 0 and t["errors"] == 0, t
    rows = {r["precision"]: r for r in out["bench_train"]["rows"]}
    assert set(rows) == {"bfloat16", "float32"}
    for row in rows.values():  # MFU against the matmul peak measured in that run
        assert row["jaxtl_img_s"] > 0 and row["jaxtl_gflop_per_step"] > 0 and 0 < row["mfu"] < 1, row
    probe = out["step_probe"]["kernels"]
    # the plain kernels (what 'auto' picks off the CPU): forward-mode AD agrees with reverse mode, no conditional
    assert probe["plain"]["jvp"]["ok"] and probe["plain"]["conditionals"] == 0, probe["plain"]
    # the CPU kernels: custom_vjp (no jvp) and a conditional per conv -- the probe sees both, so it can fail
    assert not probe["auto"]["jvp"]["ok"] and "custom_vjp" in probe["auto"]["jvp"]["error"], probe["auto"]
    assert probe["auto"]["conditionals"] > 0
