"""jaxtl/progress.py: TensorBoard logging does not drag PyTorch into a training run."""

import importlib.util
import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
from pathlib import Path
from jaxtl.progress import HistoryLogger
log = HistoryLogger(sys.argv[1])
log.log_step(1, 0.5, 1e-3)
log.log_epoch({"epoch": 0, "train_loss": 0.5, "valid_loss": 0.4, "time": 1.0}, 1)
log.close()
torch_after_logging = "torch" in sys.modules
import torch  # the import hiding must not outlive tensorboardX's import
events = [p.name for p in (Path(sys.argv[1]) / "tb").iterdir()]
print(json.dumps({"torch_after_logging": torch_after_logging, "torch_ok": hasattr(torch, "Tensor"), "events": events}))
"""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed: nothing to hide")
def test_tensorboard_logging_does_not_import_torch(tmp_path):
    # A fresh interpreter: this test process may have imported torch already (the parity tests do).
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch_after_logging"] is False
    assert res["torch_ok"] is True
    assert any(name.startswith("events.out.tfevents") for name in res["events"])
