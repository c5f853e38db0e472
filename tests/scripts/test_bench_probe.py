"""scripts/bench_probe.py: a probe epoch against a frozen-phase epoch of the same run, table + JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_probe_and_frozen_epochs_timed_in_one_run(tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXTL_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_probe.py"), "--data", "", "--size", "32",
                           "--batch", "16", "--epochs", "2", "--workdir", str(tmp_path / "w"), "--json", str(out)],
                          check=True, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    res = json.loads(out.read_text())
    fz, pr = res["runs"]["frozen"], res["runs"]["probe"]
    assert len(fz["epoch_train_s"]) == len(pr["epoch_train_s"]) == 2
    assert fz["feature_pass_s"] == 0 and pr["feature_pass_s"] > 0  # the probe's pass over the images, timed once
    assert res["speedup_train"] == pytest.approx(fz["steady_train_s"] / pr["steady_train_s"])
    assert res["speedup_train"] > 1  # no body in the probe's step
    assert "probe epoch" in proc.stdout and "frozen" in proc.stdout
