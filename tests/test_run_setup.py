"""jaxtl/run_setup.py: Learner.from_config sets a run up as jaxtl.main does (compilation cache, train.log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import jax
events = {}
jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
from jaxtl.config import base_config
from jaxtl.learner import Learner
c = base_config()
c.data.source, c.data.demo_images, c.data.size, c.data.valid_pct = "demo", 8, 32, 0.25
c.model.arch, c.model.pretrained = "resnet18", ""
c.train.batch_size, c.train.max_steps, c.train.checkpoint = 4, 1, False
c.train.compile_cache_dir = sys.argv[1]
learn = Learner.from_config(c, workdir=sys.argv[2])
learn.fit_one_cycle(1, 1e-3)
learn.predict([learn.data.valid_items[0][0]])
print("EVENTS=" + json.dumps(events))
"""


def _run(tmp_path: Path, work: str) -> dict[str, int]:
    env = {**os.environ, "JAXTL_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "xla"), str(tmp_path / work)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("EVENTS="))
    return json.loads(line[len("EVENTS="):])


@pytest.mark.slow
def test_a_second_from_config_process_compiles_nothing_again(tmp_path):
    first = _run(tmp_path, "w1")
    requests, misses = "/jax/compilation_cache/compile_requests_use_cache", "/jax/compilation_cache/cache_misses"
    assert first.get(requests, 0) > 0 and first.get(misses, 0) > 0  # the persistent cache is on, and filled
    second = _run(tmp_path, "w2")
    assert second.get(misses, 0) == 0, second  # every program came from JAX's persistent cache
    assert any(Path(tmp_path / "xla").iterdir())
    log = (tmp_path / "w2" / "train.log").read_text()
    assert "data: " in log and "random valid_pct=0.25 split" in log  # the run's description line
    assert json.loads((tmp_path / "w2" / "config.json").read_text())["data"]["source"] == "demo"


def test_setup_logging_adds_one_handler_per_file(tmp_path):
    from jaxtl.run_setup import log, setup_logging

    before = list(log.handlers)
    try:
        setup_logging(tmp_path)
        setup_logging(tmp_path)
        added = [h for h in log.handlers if h not in before]
        assert len(added) == 1 and Path(added[0].baseFilename) == (tmp_path / "train.log").absolute()
    finally:
        for h in log.handlers[:]:
            if h not in before:
                log.removeHandler(h)
                h.close()
