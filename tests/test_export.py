"""``python -m jaxtl.predict --export``: a jax.export artifact that a process without jaxtl (jax + numpy only)
runs on images, matching ``jaxtl.predict``'s probabilities within 1e-5."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxtl import predict
from jaxtl.models import create_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Runs in a fresh interpreter: the editable install's finder is removed first, so ``import jaxtl`` cannot work.
LOADER = r"""
import json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import importlib.util
assert importlib.util.find_spec("jaxtl") is None, "jaxtl is importable"
import numpy as np
from jax import export
out_dir, pixels, result = sys.argv[1:4]
exported = export.deserialize(open(f"{out_dir}/model.jax", "rb").read())
spec = json.load(open(f"{out_dir}/model.json"))
probs = np.asarray(exported.call(np.load(pixels)))
np.save(result, probs)
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("jaxtl")), "classes": spec["classes"]}))
"""


@pytest.mark.tensorflow
def test_exported_artifact_runs_without_jaxtl_and_matches_predict(tmp_path):
    size, classes = 48, ["ants", "bees", "wasps"]
    model = create_model("resnet18", len(classes))
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3)), train=False))(jax.random.PRNGKey(3))
    run = tmp_path / "run"
    predict.save_for_inference(run, v, arch="resnet18", head="fastai", classes=classes, size=size, mean=MEAN,
                               std=STD)
    rng = np.random.default_rng(0)
    images = []
    for i, shape in enumerate([(60, 80), (100, 50), (48, 48), (31, 70), (90, 90)]):
        path = tmp_path / f"img{i}.png"
        smooth = np.kron(rng.integers(0, 256, (shape[0] // 6 + 1, shape[1] // 6 + 1, 3)), np.ones((6, 6, 1)))
        Image.fromarray(smooth[:shape[0], :shape[1]].astype(np.uint8)).save(path)
        images.append(str(path))

    assert predict.main(["--workdir", str(run), "--export", str(tmp_path / "export")]) == 0
    spec = json.loads((tmp_path / "export" / "model.json").read_text())
    assert spec["classes"] == classes and spec["input"]["size"] == size and spec["input"]["dtype"] == "uint8"
    assert spec["input"]["mean"] == list(MEAN) and spec["input"]["std"] == list(STD)
    assert set(spec["platforms"]) == {"cpu", "cuda"}

    p = predict.load_predictor(run)
    want = p.probabilities(np.stack([p.preprocess(x) for x in images]))
    assert np.abs(want - 1 / 3).max() > 1e-3  # not a uniform output that anything would match
    np.save(tmp_path / "pixels.npy", np.stack([p.preprocess.pixels(x) for x in images]))
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER, str(tmp_path / "export"), str(tmp_path / "pixels.npy"),
                           str(tmp_path / "probs.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"modules": [], "classes": classes}
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), want, atol=1e-5, rtol=0)


def test_predict_without_images_or_export_is_a_clear_error(tmp_path, capsys):
    model = create_model("resnet18", 2)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))
    predict.save_for_inference(tmp_path, v, arch="resnet18", head="fastai", classes=["a", "b"], size=32, mean=MEAN,
                               std=STD)
    assert predict.main(["--workdir", str(tmp_path)]) == 2
    assert "--export DIR" in capsys.readouterr().err
