"""The same config and seed give the same run on CPU: two separate ``python -m jaxtl.main`` processes with the
tiny demo config produce identical history.csv rows (all but the wall-clock time), byte-identical
model.safetensors, and bit-identical final checkpoints (parameters, BatchNorm statistics, optimiser state, RNG)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "reliability"))
import common  # noqa: E402


def final_checkpoint(work: Path) -> tuple[int, dict]:
    from jaxtl.checkpoint import Checkpointer

    ck = Checkpointer(work)
    try:
        return ck.latest_step(), ck.restore_state(None)
    finally:
        ck.close()


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_run(tmp_path, tmp_path_factory):
    first = common.reference_run(tmp_path_factory)
    shared = common.shared_dir(tmp_path_factory)
    second = tmp_path / "second"
    r = common.run_cli(shared, *common.TINY_DEMO, workdir=second)
    assert r.returncode == 0, common.tail(r.stdout + r.stderr)

    rows = common.history_rows(first)
    assert len(rows) == 2 and all(math.isfinite(float(row["train_loss"])) for row in rows)
    assert common.history_rows(second) == rows

    a, meta_a = common.model_file(first)
    b, meta_b = common.model_file(second)
    assert common.differing_tensors(a, b) == []
    assert meta_a == meta_b
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()

    step_a, state_a = final_checkpoint(first)
    step_b, state_b = final_checkpoint(second)
    assert step_a == step_b == common.TINY_STEPS
    leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
    assert jax.tree.structure(state_a) == jax.tree.structure(state_b) and len(leaves_a) > 100
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
