"""Data parallelism: jit-sharded, pmap and single-device training agree on 4 CPU devices (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtl.parallel import DataParallel
from jaxtl.train import enable_compilation_cache

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "parallel_equivalence.py")], env=env, capture_output=True,
                          text=True, timeout=900, cwd=HERE.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_one_step_update_matches_single_device(four_devices):
    """Gradients (pmean under pmap, global mean under sharded jit) and synced BatchNorm statistics equal the
    single-device ones up to float32 reduction order: update within 1e-4 and running stats within 2e-5 of the
    largest value of each leaf; the first loss within 1e-5 relative."""
    upd = four_devices["update"]
    for mode in ("jit4", "pmap4"):
        assert upd[mode]["params"] < 1e-4, (mode, upd[mode])
        assert upd[mode]["batch_stats"] < 2e-5, (mode, upd[mode])
        assert upd[mode]["loss"] == pytest.approx(upd["jit1"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_losses_match_over_several_steps(four_devices):
    """Four Adam steps of fastai's frozen phase: losses within 1e-4 relative; masked eval sums within 1e-4."""
    fr = four_devices["frozen"]
    for mode in ("jit4", "pmap4"):
        np.testing.assert_allclose(fr[mode]["losses"], fr["jit1"]["losses"], rtol=1e-4)
        assert fr[mode]["sums"]["count"] == 6.0 and fr[mode]["sums"]["correct"] == fr["jit1"]["sums"]["correct"]
        assert fr[mode]["sums"]["loss"] == pytest.approx(fr["jit1"]["sums"]["loss"], rel=1e-4)
    # head dropout: the sharded jit step draws the same masks as one device
    dr = four_devices["dropout"]
    np.testing.assert_allclose(dr["jit4"]["losses"], dr["jit1"]["losses"], rtol=1e-4)
    assert four_devices["cache_size"] == [1, 1, 1]  # one compilation for all steps


@pytest.mark.slow
def test_donation_never_deletes_callers_arrays_and_batch_error(four_devices):
    assert four_devices["originals_deleted"] == 0
    err = four_devices["bad_batch_error"]
    assert err and "train.batch_size=6" in err and "batch_size=8" in err


def test_single_device_placement_roundtrip():
    par = DataParallel("jit", devices=jax.devices()[:1])
    b = par.put_batch({"image": np.ones((4, 2, 2, 3), np.float32), "label": np.arange(4, dtype=np.int32)})
    assert b["image"].shape == (4, 2, 2, 3) and b["label"].sharding == par.batch_sharding
    np.testing.assert_array_equal(par.local_outputs(b["label"]), np.arange(4))
    tree = par.put_state({"w": np.arange(3.0)})
    assert par.to_host(tree)["w"].tolist() == [0.0, 1.0, 2.0]
    pm = DataParallel("pmap", devices=jax.devices()[:1])
    assert pm.model_axis_name == "batch" and par.model_axis_name is None
    pb = pm.put_batch({"label": np.arange(4, dtype=np.int32)})
    assert pb["label"].shape == (1, 4)
    with pytest.raises(ValueError, match="train.parallel"):
        DataParallel("shard_map")


def test_enable_compilation_cache(tmp_path):
    old = jax.config.jax_compilation_cache_dir
    try:
        path = enable_compilation_cache(str(tmp_path / "xla"))
        assert path.is_dir() and jax.config.jax_compilation_cache_dir == str(path)
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
