"""Multi-process training with JAX's own runtime: 2 local CPU processes (``jax.distributed`` on a localhost
coordinator, gloo collectives) run ``python -m jaxtl.main`` and are compared with a 1-process run over the same
global batches.

Three launches (tests/distributed/worker.py), every one under a timeout so a hang fails instead of blocking:

1. reference: 1 process with 2 CPU devices trains the 2-process run's global batches (build_data's process shards
   0 and 1, concatenated), checkpointing in ``ref/``;
2. two processes x 1 CPU device run the CLI with its default work dir (coordinator, process count and id from
   JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; process 1's clock an hour ahead), recording the
   batches each consumed and the files each wrote, then restore the reference's checkpoint on their 2-process
   mesh, then run the recipe again with a stop requested on process 1 only;
3. 1 process with 2 devices loads the 2-process run's final weights and resumes a copy of its work dir stepped
   back to its first checkpoint, finishing it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "distributed" / "worker.py"
N_TRAIN, N_VALID, STEPS_PER_EPOCH, EPOCHS = 24, 7, 3, 2
TIMEOUT_S = 420  # per launch; the whole module takes ~2-4 minutes on 2 CPU cores
LOSS_RTOL = 1e-5  # per-step losses, 2 processes vs 1 process over the same global batch (float32)
PARAM_ATOL = 1e-5  # parameters / BatchNorm statistics after 6 Adam steps at lr <= 1e-3

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_")) and k not in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    env.update(extra)
    return env


def _launch(jobs: list[tuple[list[str], dict[str, str], Path]], timeout: float = TIMEOUT_S,
            cwd: Path = ROOT) -> list[str]:
    """Start every job at once; wait for all under one deadline. A job that fails or a hang kills the others and
    fails the test with the logs' tails. Returns each job's output."""
    procs = []
    for args, env, log in jobs:
        f = open(log, "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=cwd, stdout=f,
                                       stderr=subprocess.STDOUT), f, log))
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(p.poll() is None for p, _, _ in procs):
            bad = [p for p, _, _ in procs if p.poll() not in (None, 0)]
            if bad:
                failed = f"a process exited with {bad[0].returncode}"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f}s (hang?)"
                break
            time.sleep(0.5)
        else:
            bad = [p for p, _, _ in procs if p.returncode != 0]
            failed = f"a process exited with {bad[0].returncode}" if bad else None
    finally:
        for p, f, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            f.close()
    outputs = [log.read_text(errors="replace") for _, _, log in procs]
    if failed:
        tails = "\n".join(f"--- {log.name} ---\n{out[-3000:]}" for (_, _, log), out in zip(procs, outputs, strict=True))
        pytest.fail(f"{failed}\n{tails}")
    return outputs


def _load(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    info = json.loads(out.with_suffix(".json").read_text())
    with np.load(out.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return info, arrays


def _variables(arrays: dict[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items()
            if k.startswith(prefix) and k[len(prefix):].startswith(("params/", "batch_stats/"))}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert sorted(a) == sorted(b) and len(a) > 100  # resnet18 + fastai head: 110 leaves
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sys.path.insert(0, str(WORKER.parent))
    try:
        import worker
    finally:
        sys.path.remove(str(WORKER.parent))
    tmp = tmp_path_factory.mktemp("distributed")
    data, cache = str(worker.make_dataset(tmp / "data")), str(tmp / "xla_cache")
    two_devices = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    t0 = time.monotonic()

    # 1. reference: 1 process, 2 devices, the 2-process run's global batches
    _launch([(["reference", data, str(tmp / "ref"), str(tmp / "ref_out"), cache], two_devices, tmp / "ref.log")])
    t1 = time.monotonic()

    # 2. two processes x 1 device: the CLI, then restore the reference's checkpoint on their mesh
    coord = f"127.0.0.1:{_free_port()}"
    (tmp / "cwd").mkdir()
    logs = _launch([(["cli", data, str(tmp / f"run_out{i}"), cache, str(tmp / "ref")],
                     _env(JAX_COORDINATOR_ADDRESS=coord, JAX_COORDINATOR_BIND_ADDRESS=coord,  # no IPv6 needed
                          JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                     tmp / f"run{i}.log") for i in range(2)], cwd=tmp / "cwd")
    t2 = time.monotonic()
    proc = [_load(tmp / f"run_out{i}") for i in range(2)]
    run = Path(proc[0][0]["workdir"])  # the CLI's default work dir, runs/config/<date-time> under its cwd

    # 3. 1 process, 2 devices: load the 2-process run's weights; resume a copy stepped back to its first checkpoint
    shutil.copytree(run, tmp / "resumed")
    steps = sorted(int(p.name) for p in (tmp / "resumed" / "checkpoints").iterdir() if p.name.isdigit())
    for s in steps[1:]:
        shutil.rmtree(tmp / "resumed" / "checkpoints" / str(s))
    _launch([(["resume", data, str(tmp / "resumed"), str(tmp / "resumed_out"), cache, str(run)],
              two_devices, tmp / "resumed.log")])
    t3 = time.monotonic()
    print(f"\ntest_distributed launches: reference {t1 - t0:.0f}s, 2 processes {t2 - t1:.0f}s, resume {t3 - t2:.0f}s")
    return {"tmp": tmp, "run": run, "ref": _load(tmp / "ref_out"), "proc": proc,
            "stop": [json.loads((tmp / f"run_out{i}_stop.json").read_text()) for i in range(2)],
            "pmap": [json.loads((tmp / f"run_out{i}_pmap.json").read_text()) for i in range(2)],
            "resumed": _load(tmp / "resumed_out"), "logs": logs, "checkpoint_steps": steps}


@pytest.mark.slow
def test_both_processes_end_with_identical_parameters(runs):
    (i0, a0), (i1, a1) = runs["proc"]
    assert [i0["process_index"], i1["process_index"]] == [0, 1]
    assert i0["process_count"] == i1["process_count"] == 2 and i0["device_count"] == 2
    v0, v1 = _variables(a0), _variables(a1)
    assert _max_diff(v0, v1) == 0.0  # each process's own replica, bitwise equal
    assert i0["global_step"] == i1["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert i0["losses"] == i1["losses"]
    untimed = [[{k: v for k, v in row.items() if k not in ("time", "seconds")} for row in i["history"]]
               for i in (i0, i1)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == EPOCHS


@pytest.mark.slow
def test_processes_read_disjoint_shards_that_cover_the_training_set(runs):
    """Labels are image ids here (one class per training image)."""
    ref_info, _ = runs["ref"]
    recs = [info["batches"] for info, _ in runs["proc"]]
    orders = []
    for epoch in range(EPOCHS):
        seen = []
        for rec in recs:
            mine = [b for b in rec if b["epoch"] == epoch]
            assert [b["step"] for b in mine] == list(range(STEPS_PER_EPOCH))
            assert all(len(b["labels"]) == 4 for b in mine)  # per-process batch = global 8 / 2 processes
            seen.append([y for b in mine for y in b["labels"]])
        assert not set(seen[0]) & set(seen[1]), f"epoch {epoch}: both processes read {set(seen[0]) & set(seen[1])}"
        assert sorted(seen[0] + seen[1]) == list(range(N_TRAIN))  # every image once per epoch
        orders.append(seen[0] + seen[1])
    assert orders[0] != orders[1]  # reshuffled between epochs
    # the reference run consumed exactly these batches (labels and pixels), process 0's rows first
    ref = ref_info["batches"]
    assert len(ref) == 2 * EPOCHS * STEPS_PER_EPOCH
    for k, b in enumerate(ref):
        mine = recs[k % 2][k // 2]
        assert (b["epoch"], b["step"], b["labels"]) == (mine["epoch"], mine["step"], mine["labels"])
        assert b["checksum"] == pytest.approx(mine["checksum"], rel=1e-6)


@pytest.mark.slow
def test_losses_and_parameters_equal_a_single_process_run_over_the_same_global_batch(runs):
    """2 processes x 1 device vs 1 process x 2 devices on the same global batches: per-step losses within
    LOSS_RTOL relative, final parameters and BatchNorm statistics within PARAM_ATOL (observed: bitwise equal)."""
    ref_info, ref_arrays = runs["ref"]
    info, arrays = runs["proc"][0]
    assert len(info["losses"]) == EPOCHS * STEPS_PER_EPOCH
    np.testing.assert_allclose(info["losses"], ref_info["losses"], rtol=LOSS_RTOL)
    assert _max_diff(_variables(arrays), _variables(ref_arrays)) <= PARAM_ATOL
    # the runs did train (the comparison is not of two initialisations)
    assert _max_diff(_variables(arrays), _variables(ref_arrays, "init/")) > 1e-3


@pytest.mark.slow
def test_validation_counts_every_image_once_over_processes(runs):
    """7 validation images over 2 processes (4 + 3, process 1 padded): the epoch metrics equal the reference's
    (every image counted once, padding nowhere), and the gathered predictions come back in the global order."""
    ref_info, ref_arrays = runs["ref"]
    info, arrays = runs["proc"][0]
    for row, ref_row in zip(info["history"], ref_info["history"], strict=True):
        for k in ("valid_loss", "accuracy", "top_5_accuracy"):
            assert row[k] == pytest.approx(ref_row[k], rel=1e-5), k
    labels = info["valid_labels"]
    assert labels == list(range(0, 3 * N_VALID, 3))  # global order: process p holds items p, p+2, ...
    assert runs["proc"][1][0]["valid_labels"] == labels  # every process gets the whole set
    probs = arrays["valid_probs"]
    assert probs.shape == (N_VALID, N_TRAIN)
    ref_by_label = dict(zip(ref_info["valid_labels"], ref_arrays["valid_probs"], strict=True))
    np.testing.assert_allclose(probs, np.stack([ref_by_label[y] for y in labels]), atol=1e-5)
    ce = -np.log(probs[np.arange(N_VALID), labels]).mean()
    assert ce == pytest.approx(info["history"][-1]["valid_loss"], rel=1e-4)


@pytest.mark.slow
def test_only_process_0_writes_the_run_files(runs):
    (i0, a0), (i1, _) = runs["proc"]
    # the default work dir: the same on both processes although process 1's clock reads an hour ahead
    assert i0["workdir"] == i1["workdir"] and Path(i0["workdir"]).parent == runs["tmp"] / "cwd" / "runs" / "config"
    assert i0["written_outside"] == i1["written_outside"] == []
    allowed = ("checkpoints/",)  # orbax: every process writes its part of a checkpoint
    others = [p for p in i1["written"] if p != "." and not p.startswith(".write_probe.") and not p.startswith(allowed)]
    assert others == [], others
    assert any(p.startswith(allowed) for p in i1["written"])  # process 1 did take part in the checkpoints
    w0 = i0["written"]
    for name in ("config.json", "train.log", "history.csv.tmp", "loss_curves.png", "confusion_matrix.png",
                 "top_losses.png"):
        assert name in w0, name
    assert any(p.startswith("tb/events") for p in w0) and any(p.startswith(".model.safetensors") for p in w0)
    run = runs["run"]
    with open(run / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == EPOCHS
    from safetensors.numpy import load_file

    saved = load_file(run / "model.safetensors")
    assert _max_diff({k: saved[k] for k in _variables(a0)}, _variables(a0)) == 0.0
    out0, out1 = runs["logs"]
    assert "train_loss" in out0 and "jaxtl: work dir" in out0 and "jaxtl: done" in out0
    assert "train_loss" not in out1 and "jaxtl: work dir" not in out1 and "jaxtl: done" not in out1


@pytest.mark.slow
def test_checkpoints_move_between_1_and_2_processes(runs):
    """1 -> 2: the reference's checkpoint (1 process, 2 devices) restores on the 2-process mesh bitwise, replicated
    over both processes' devices. 2 -> 1: the 2-process run's checkpoints load in 1 process bitwise, and resuming
    its first-epoch checkpoint there finishes the run as the reference did (same tolerances as above)."""
    ref_info, ref_arrays = runs["ref"]
    ref_vars = _variables(ref_arrays)
    for info, arrays in runs["proc"]:
        assert info["restored_step"] == EPOCHS * STEPS_PER_EPOCH
        assert info["restored_devices"] == 2 and info["restored_fully_replicated"]
        assert _max_diff(_variables(arrays, "restored/"), ref_vars) == 0.0
    assert runs["checkpoint_steps"] == [STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH]
    info, arrays = runs["resumed"]
    assert _max_diff(_variables(arrays, "loaded/"), _variables(runs["proc"][0][1])) == 0.0
    assert info["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert [(b["epoch"], b["step"]) for b in info["batches"][::2]] == [(1, s) for s in range(STEPS_PER_EPOCH)]
    np.testing.assert_allclose(info["losses"], ref_info["losses"], rtol=LOSS_RTOL)
    assert len(info["history"]) == EPOCHS
    assert _max_diff(_variables(arrays), ref_vars) <= PARAM_ATOL


@pytest.mark.slow
def test_a_stop_requested_on_one_process_stops_all_after_the_same_step(runs):
    """After the CLI run, each process ran the recipe again with only process 1 requesting a stop at its first
    batch: both stopped after that one step, as interrupted, with the step checkpointed (a disagreement would
    leave one process waiting in a collective: the launch's timeout)."""
    for stop in runs["stop"]:
        assert stop == {"stopped_early": True, "stop_reason": "interrupted", "steps": 1,
                        "checkpoint": EPOCHS * STEPS_PER_EPOCH + 1}


@pytest.mark.slow
def test_pmap_mode_reduces_over_both_processes(runs):
    """train.parallel="pmap" maps over every device of every process: its evaluation psum counts all 7 validation
    images (a pmap over local devices only would count 4 or 3) and agrees with the jit evaluation (1e-5)."""
    for ev in runs["pmap"]:
        assert ev["pmap"]["count"] == N_VALID
        for k in ("valid_loss", "accuracy", "top_5_accuracy"):
            assert ev["pmap"][k] == pytest.approx(ev["jit"][k], rel=1e-5), k


def test_distributed_is_requested_by_the_flag_or_the_environment_only():
    """A plain run (or a single python inside a SLURM allocation) stays one process."""
    from jaxtl.parallel import distributed_requested

    assert not distributed_requested(False, {})
    assert not distributed_requested(False, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"})
    assert distributed_requested(True, {})
    assert distributed_requested(False, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert distributed_requested(False, {"JAX_NUM_PROCESSES": "2"})


def test_initialize_distributed_names_a_bad_environment_variable():
    from jaxtl.parallel import initialize_distributed

    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "first"}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='first' must be an integer"):
        initialize_distributed(environ=env)
