"""jaxtl's safetensors weight format, format detection, and the `python -m jaxtl.convert` CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from jaxtl.convert import detect_format, load_torchvision, load_variables, save_variables


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    variables = {
        "params": {"body": {"conv1": {"kernel": rng.normal(size=(7, 7, 3, 4)).astype(np.float32)}},
                   "head": {"fc2": {"kernel": rng.normal(size=(8, 3)).astype(np.float32)}}},
        "batch_stats": {"body": {"bn1": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}},
    }
    path = save_variables(tmp_path / "sub" / "w.safetensors", variables, {"arch": "resnet18", "note": 1})
    out, meta = load_variables(path)
    assert meta == {"arch": "resnet18", "head": "fastai", "num_classes": 3, "note": "1", "format": "jaxtl"}
    kernel = variables["params"]["body"]["conv1"]["kernel"]
    np.testing.assert_array_equal(out["params"]["body"]["conv1"]["kernel"], kernel)
    np.testing.assert_array_equal(out["batch_stats"]["body"]["bn1"]["var"], 1.0)
    # The on-disk layout is the documented one: '/'-joined keys plus string metadata.
    raw = safetensors.numpy.load_file(str(path))
    assert set(raw) == {"params/body/conv1/kernel", "params/head/fc2/kernel", "batch_stats/body/bn1/mean",
                        "batch_stats/body/bn1/var"}
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temp file left behind
    with pytest.raises(ValueError, match="'arch'"):
        save_variables(tmp_path / "x.safetensors", variables, {})


def test_load_variables_rejects_foreign_safetensors(tmp_path):
    path = tmp_path / "timm.safetensors"
    safetensors.numpy.save_file({"conv1.weight": np.zeros((1,), np.float32)}, str(path))
    with pytest.raises(ValueError, match="not a jaxtl weights file"):
        load_variables(path)


def test_detect_format(tmp_path, resnet18_pth):
    assert detect_format(resnet18_pth) == "torchvision"
    timm = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"fc.bias": np.zeros(2, np.float32)}, str(timm), metadata={"format": "pt"})
    assert detect_format(timm) == "timm"
    ours = save_variables(tmp_path / "ours.safetensors", {"params": {}}, {"arch": "resnet18"})
    assert detect_format(ours) == "jaxtl"
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="unknown weights format"):
        detect_format(junk)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxtl.convert", *args], capture_output=True, text=True,
                          timeout=180)


def test_cli_help():
    res = _cli("--help")
    assert res.returncode == 0
    for word in ("SRC", "--arch", "--out", "--format", "torchvision", "timm", "resnet34.tv_in1k", "--no-strict"):
        assert word in res.stdout, word


def test_cli_converts_and_reports_errors(tmp_path, resnet18_pth):
    out = tmp_path / "r18.safetensors"
    res = _cli(str(resnet18_pth), "--arch", "resnet18", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout
    variables, meta = load_variables(out)
    assert meta["arch"] == "resnet18" and meta["head"] == "linear" and meta["num_classes"] == 5
    ref = load_torchvision(str(resnet18_pth), "resnet18")
    np.testing.assert_array_equal(variables["params"]["body"]["layer4_1"]["conv2"]["kernel"],
                                  ref["params"]["body"]["layer4_1"]["conv2"]["kernel"])

    bad = _cli(str(resnet18_pth), "--arch", "resnet50", "--out", str(tmp_path / "bad.safetensors"))
    assert bad.returncode == 1
    assert "does not match arch='resnet50'" in bad.stderr and "match resnet18" in bad.stderr
    assert not (tmp_path / "bad.safetensors").exists()
