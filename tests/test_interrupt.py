"""Interrupted runs lose nothing (subprocesses, as a user or a cloud scheduler stops them):

- SIGINT (Ctrl-C) and SIGTERM (preemption) during ``python -m jaxtl.main``: the current step finishes, a checkpoint
  is saved, the exit code is 128 + signal and the output says how to resume;
- ``--resume`` then continues the schedule and the data order exactly: the final model.safetensors is
  byte-identical to an uninterrupted run's with the same seed, and history.csv has the same rows (except time);
- SIGKILL while a checkpoint is being written leaves the previous checkpoint complete and loadable, and a new
  process can go on writing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "reliability"))
import common  # noqa: E402


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {path.name} appeared:\n"
                        + common.tail(log.read_text()))
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("sig,trigger", [
    pytest.param(signal.SIGINT, "tb", id="SIGINT-mid-first-epoch"),  # tb/ appears when step 1's loss is logged
    pytest.param(signal.SIGTERM, "history.csv", id="SIGTERM-at-phase-change"),  # written at the end of epoch 0
])
def test_signal_saves_checkpoint_and_resume_equals_uninterrupted_run(sig, trigger, tmp_path, tmp_path_factory):
    from jaxtl.checkpoint import Checkpointer

    reference = common.reference_run(tmp_path_factory)
    shared = common.shared_dir(tmp_path_factory)
    work, log = tmp_path / "run", tmp_path / "run.log"
    proc = common.start_cli(shared, *common.TINY_DEMO, workdir=work, log=log)
    try:
        wait_for(work / trigger, proc, log)
        proc.send_signal(sig)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert "Traceback" not in out, common.tail(out)
    assert rc == 128 + sig, f"exit {rc}:\n{common.tail(out)}"
    assert f"stopped by {signal.Signals(sig).name}" in out and f"--workdir {work} --resume" in out, common.tail(out)

    ck = Checkpointer(work)
    try:
        step = ck.latest_step()
        meta = ck.restore_meta()
    finally:
        ck.close()
    assert step is not None and 0 < step < common.TINY_STEPS, (step, common.tail(out))
    assert meta["global_step"] == step and f"stopped at step {step}" in out
    assert not (work / "model.safetensors").exists()  # the report is written only by a finished run

    r = common.run_cli(shared, *common.TINY_DEMO, "--resume", workdir=work)
    assert r.returncode == 0, common.tail(r.stdout + r.stderr)
    assert f"resumed from step {step}" in r.stderr
    assert common.history_rows(work) == common.history_rows(reference)
    assert len(common.history_rows(work)) == 2
    got, got_meta = common.model_file(work)
    want, want_meta = common.model_file(reference)
    assert common.differing_tensors(got, want) == []  # bit-equal on CPU
    assert got_meta == want_meta
    assert (work / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def _restore(work: Path) -> tuple[int | None, dict | None, dict | None]:
    from jaxtl.checkpoint import Checkpointer

    ck = Checkpointer(work)
    try:
        step = ck.latest_step()
        if step is None:
            return None, None, None
        return step, ck.restore_meta(), ck.restore_state(None)
    finally:
        ck.close()


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    """Three writer processes in turn, each SIGKILLed part-way through a write (timed from the writer's own
    first-write duration); after every kill the latest checkpoint is complete: all its arrays equal its step and
    its metadata matches. At least one kill must land while a temporary (unfinished) checkpoint exists."""
    work = tmp_path / "ck"
    script = common.ROOT / "tests" / "reliability" / "ckpt_writer.py"
    mid_write, steps_seen = 0, []
    next_step = 1
    for fraction in (0.3, 0.5, 0.7):
        proc = subprocess.Popen([sys.executable, "-u", str(script), str(work), str(next_step)], cwd=common.ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=common.cli_env(tmp_path))
        try:
            started = {}
            durations = []
            while True:
                line = proc.stdout.readline()
                assert line, f"writer exited with {proc.wait()}"
                word, k = line.split()
                if word == "saving":
                    started[int(k)] = time.time()
                    if durations:  # the second write of this process: kill it part-way through
                        time.sleep(durations[0] * fraction)
                        proc.send_signal(signal.SIGKILL)
                        break
                else:
                    durations.append(time.time() - started[int(k)])
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        leftovers = [p.name for p in (work / "checkpoints").iterdir() if "tmp" in p.name]
        mid_write += bool(leftovers)
        step, meta, state = _restore(work)
        assert step is not None and step >= next_step, (step, next_step)
        assert meta == {"step": step}
        for leaf in (state["params"]["w"], state["params"]["b"], state["step"]):
            assert np.all(np.asarray(leaf) == step), f"checkpoint {step} holds other values"
        steps_seen.append(step)
        next_step = step + 1  # the next writer continues after the surviving checkpoint (a fresh process)
    assert steps_seen == sorted(steps_seen)
    assert mid_write >= 1, "no kill landed during a write; the writer's state is too small to time the kill"
