"""scripts/bench_input.py --cores: per-core host throughput, each core count in its own pinned process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.tensorflow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_per_core_rows_and_bytes_per_image(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.jpg")
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_input.py"), "--data", str(tmp_path / "imgs"),
                    "--size", "64", "--batch", "4", "--epochs", "2", "--cache", "--skip-step", "--cores", "1,2",
                    "--json", str(out)], check=True, cwd=ROOT, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["per_core"]
    assert len(rows) == 2
    for cores, r in zip((1, 2), rows, strict=True):
        assert r["pipeline_img_s"] > 0
        assert r["img_s_per_core"] == pytest.approx(r["pipeline_img_s"] / cores)
        # data.cache: the second epoch comes from memory, through the same (run-long) pipeline
        assert r["cache"] and r["later_epochs_img_s"] > 0 and r["pipelines_built"] == 1
        assert r["later_epochs_img_s_per_core"] == pytest.approx(r["later_epochs_img_s"] / cores)
        # the uint8 pixels + label (int32) + the batch transforms' draws (affine 8 x f32, flip bool, lighting 2 x f32)
        assert r["image_dtype"] == "uint8" and r["bytes_per_image"] == 64 * 64 * 3 + 4 + 32 + 1 + 8
