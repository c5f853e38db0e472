"""Smoke test of scripts/bench_train.py: a tiny run in a subprocess writes the documented JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_train.py"


def _run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--arch", "resnet18", "--size", "32", "--batch", "2", "--steps", "2",
           "--warmup", "0", "--rounds", "2", "--pause", "0", "--json", str(out), *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_bench_train_json_and_table(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    res, stdout = _run(tmp_path, "--phases", "unfrozen,frozen_no_bn", "--precisions", "float32")
    for key in ("jaxtl_img_s", "torch_img_s", "ratio", "frozen_no_bn_img_s", "frozen_no_bn_vs_unfrozen", "rows",
                "env"):
        assert key in res, key
    assert [(r["phase"], r["precision"]) for r in res["rows"]] == [("unfrozen", "float32"),
                                                                   ("frozen_no_bn", "float32")]
    un, fz = res["rows"]
    assert res["jaxtl_img_s"] == un["jaxtl_img_s"] > 0
    assert res["torch_img_s"] == max(un["torch_nchw_img_s"], un["torch_channels_last_img_s"]) > 0
    assert res["ratio"] == pytest.approx(un["jaxtl_img_s"] / un["torch_img_s"])
    assert res["frozen_no_bn_vs_unfrozen"] == pytest.approx(fz["jaxtl_img_s"] / un["jaxtl_img_s"])
    for r in res["rows"]:
        assert r["jaxtl_peak_rss_mb"] > 0 and r["torch_peak_rss_mb"] > 0
        assert r["jaxtl_xla_mem_mb"] > 0 and r["jaxtl_gflop_per_step"] > 0
        assert len(r["jaxtl_block_img_s"]) == 2
        assert all(v == v for v in (r["jaxtl_loss"], r["torch_nchw_loss"]))  # finite, not NaN
        # MFU on CPU: the model FLOPs XLA counts for the step, over a matmul peak measured in the same run
        peak = r["cpu_matmul_tflop_s"]
        assert peak["peak"] == max(peak["xla"], peak["torch"]) > 0 and r["peak_tflops_per_device"] == peak["peak"]
        assert r["mfu"] == pytest.approx(r["jaxtl_tflop_s"] / peak["peak"]) and 0 < r["mfu"] < 1
        assert r["jaxtl_tflop_s"] == pytest.approx(r["jaxtl_gflop_per_step"] * r["jaxtl_img_s"] / 2 / 1e3)
        assert r["torch_mfu"] == pytest.approx(r["jaxtl_gflop_per_step"] * r["torch_img_s"] / 2 / 1e3 / peak["peak"])
    assert res["mfu"] == un["mfu"] and res["torch_mfu"] == un["torch_mfu"]
    assert "jaxtl MFU" in stdout and "torch MFU" in stdout
    # the frozen body runs forward only: far fewer FLOPs than the unfrozen step
    assert fz["jaxtl_gflop_per_step"] < 0.6 * un["jaxtl_gflop_per_step"]
    assert res["env"]["backend"] == "cpu" and res["env"]["jax"]
    assert "ratio" in stdout and "frozen_no_bn" in stdout


def test_bench_train_jaxtl_only_variants(tmp_path: Path) -> None:
    """--no-torch, one bfloat16 row, jaxtl in a worker process of its own under the --variant's XLA_FLAGS."""
    flag = "--xla_cpu_multi_thread_eigen=false"
    res, stdout = _run(tmp_path, "--phases", "frozen_no_bn", "--precisions", "bfloat16", "--no-torch",
                       "--variant", f"single={flag}")
    (row,) = res["rows"]
    assert row["phase"] == "frozen_no_bn" and row["precision"] == "bfloat16" and row["jaxtl_img_s"] > 0
    assert "torch_img_s" not in row
    assert list(row["variants"]) == ["single"] and row["jaxtl_variant"] == "single"
    assert row["variants"]["single"]["xla_flags"].endswith(flag) and row["jaxtl_xla_flags"].endswith(flag)
    v = row["variants"]["single"]
    assert v["img_s"] == row["jaxtl_img_s"] and v["peak_rss_mb"] > 0 and v["xla_mem_mb"] > 0
    assert res["jaxtl_img_s"] is None and res["ratio"] is None  # no unfrozen float32 row was asked for
    assert "single" in stdout
