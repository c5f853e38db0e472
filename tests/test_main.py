"""The CLI as a user drives it: override checks, a tiny demo run end to end, prediction, offline pets."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.data.demo_images=12", "--config.data.size=32", "--config.train.batch_size=4",
        "--config.train.epochs=1", "--config.train.freeze_epochs=1", "--config.train.max_steps=2"]


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 600,
            unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.mark.parametrize("override,message", [
    ("--config.train.lrr=1e-3", "did you mean train.lr"),
    ("--config.optim.nmae=lamb", "did you mean optim.name"),
])
def test_unknown_fields_are_rejected_with_closest_names(override, message):
    r = run_cli("jaxtl.main", "--config", "configs/demo.py", override)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("override,message", [
    ("--config.train.epochs=abc", "train.epochs"),
    ("--config.train.recipe=finetune", "did you mean 'fine_tune'"),
    ("--config.train.parallel=pjit", "train.parallel"),
])
def test_wrong_values_and_types_name_the_field(override, message, tmp_path):
    r = run_cli("jaxtl.main", "--config", "configs/demo.py", override, f"--workdir={tmp_path / 'w'}")
    assert r.returncode != 0
    assert message in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_demo_run_leaves_table_history_plots_and_a_model_that_predicts(tmp_path):
    env = {"JAXTL_CACHE": str(tmp_path / "cache"), "JAXTL_CACHE_DIR": str(tmp_path / "cache")}
    work = tmp_path / "run"
    # as a user's shell: none of the variables tests/conftest.py (apply_cpu_defaults) set for the test process
    r = run_cli("jaxtl.main", "--config", "configs/demo.py", *TINY, f"--workdir={work}",
                f"--config.train.compile_cache_dir={tmp_path / 'xla'}", env=env,
                unset=("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS"))
    assert r.returncode == 0, r.stderr[-3000:]
    console = r.stdout + r.stderr  # jaxtl's own lines only: no TensorFlow / absl / oneDNN start-up lines
    for noise in ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "port.cc", "I0000"):
        assert noise not in console, (noise, console[:2000])
    assert "train_loss" in r.stdout and "valid_loss" in r.stdout and "error_rate" in r.stdout
    with open(work / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "time"]
    assert len(rows) == 2  # frozen epoch + unfrozen epoch
    for name in ("config.json", "train.log", "model.safetensors", "loss_curves.png", "confusion_matrix.png",
                 "top_losses.png"):
        assert (work / name).is_file(), name
    assert json.loads((work / "config.json").read_text())["model"]["pretrained"] == "demo:resnet18"

    images = sorted((tmp_path / "cache").rglob("*.jpg"))[:2]
    p = run_cli("jaxtl.predict", "--workdir", str(work), *map(str, images), "--json", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    preds = json.loads(p.stdout)
    from jaxtl.predict import load_predictor

    classes = load_predictor(work).classes
    assert len(classes) == 2
    assert [r["path"] for r in preds] == [str(i) for i in images]
    for r in preds:
        assert r["label"] in classes
        assert 0.0 <= r["probability"] <= 1.0
        assert abs(sum(p for _, p in r["top"]) - r["probability"]) < 1e-6
    # a second run into the same work dir without --resume is refused, nothing overwritten
    again = run_cli("jaxtl.main", "--config", "configs/demo.py", *TINY, f"--workdir={work}", env=env)
    assert again.returncode != 0 and "--resume" in again.stderr


@pytest.mark.tensorflow  # builds the demo data
def test_pets_offline_fails_fast_naming_data_and_weights(tmp_path):
    from jaxtl.data.tfds_items import network_reachable

    if network_reachable() is None:
        pytest.skip("network reachable: pets.py would download for real")
    r = run_cli("jaxtl.main", "--config", "configs/pets.py", f"--workdir={tmp_path / 'w'}",
                f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.model.weights_dir={tmp_path / 'wc'}",
                timeout=120)
    assert r.returncode != 0
    assert "tfds build oxford_iiit_pet" in r.stderr
    assert "resnet34-b627a593.pth" in r.stderr and str(tmp_path / "wc") in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_pets_config_runs_the_fastai_task_on_a_standin_tfds_pets(tmp_path):
    """configs/pets.py (cats vs dogs) and :breeds through the CLI on a stand-in TFDS oxford_iiit_pet (the real
    name, version and features; 40 generated images in TFDS splits train 20 / test 20)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tfds_pets import write_standin_pets

    from jaxtl.predict import load_predictor

    data_dir = write_standin_pets(tmp_path / "tfds")
    small = [f"--config.data.data_dir={data_dir}", "--config.data.download=False", "--config.data.size=32",
             "--config.model.arch=resnet18", "--config.model.pretrained=demo:resnet18", "--config.train.batch_size=8",
             "--config.train.epochs=0", "--config.train.max_steps=1", f"--config.train.compile_cache_dir={tmp_path}/x"]
    env = {"JAXTL_CACHE": str(tmp_path / "cache"), "JAXTL_CACHE_DIR": str(tmp_path / "cache")}
    expect = {
        ("configs/pets.py", "0.2"): (["False", "True"], "random valid_pct=0.2 split", "32 train / 8 valid"),
        ("configs/pets.py:breeds", "0.2"): (["Abyssinian", "Bengal", "beagle", "boxer"], "random valid_pct=0.2",
                                            "32 train / 8 valid"),
        ("configs/pets.py:breeds", "0.0"): (["Abyssinian", "Bengal", "beagle", "boxer"],
                                            "its own splits 'train' and 'test'", "20 train / 20 valid"),
    }
    for k, ((config, pct), (classes, rule, sizes)) in enumerate(expect.items()):
        work = tmp_path / f"run{k}"
        r = run_cli("jaxtl.main", "--config", config, *small, f"--config.data.valid_pct={pct}", f"--workdir={work}",
                    env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert load_predictor(work).classes == classes
        text = (work / "train.log").read_text()
        assert rule in text and sizes in text, text[-2000:]
