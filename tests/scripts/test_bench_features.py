"""scripts/bench_features.py: every variant timed against the plain step of the same run, table + JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rows_per_variant_with_the_cost_against_plain(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_features.py"), "--size", "32", "--batch", "4",
                           "--steps", "1", "--rounds", "2", "--json", str(out)], check=True, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                          "JAX_PLATFORMS": "cpu"})
    res = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_features import VARIANTS

    assert [r["variant"] for r in res["rows"]] == list(VARIANTS)
    plain = res["rows"][0]["step_s_median"]
    for r in res["rows"]:
        assert len(r["step_s_all"]) == 2 and r["step_s_median"] > 0
        assert r["cost_vs_plain"] == pytest.approx(r["step_s_median"] / plain - 1)
        assert r["variant"] in proc.stdout
