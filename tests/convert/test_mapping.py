"""torchvision / timm name mapping: exact values, strict errors that name every offending key, timm files."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from torch_resnet import TorchResNet

from jaxtl.convert import (
    ConversionError,
    load_timm,
    load_torchvision,
    name_table,
    state_dict_to_variables,
    variables_to_state_dict,
)


def test_values_are_transposed_exactly(resnet18_pth, resnet18_torch):
    v = load_torchvision(str(resnet18_pth), "resnet18")
    sd = {k: t.numpy() for k, t in resnet18_torch.state_dict().items()}
    body, stats = v["params"]["body"], v["batch_stats"]["body"]
    np.testing.assert_array_equal(body["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(body["layer2_0"]["downsample_conv"]["kernel"],
                                  sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(body["layer3_1"]["bn2"]["scale"], sd["layer3.1.bn2.weight"])
    np.testing.assert_array_equal(stats["layer2_0"]["downsample_bn"]["var"], sd["layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(stats["bn1"]["mean"], sd["bn1.running_mean"])
    np.testing.assert_array_equal(v["params"]["head"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(v["params"]["head"]["fc"]["bias"], sd["fc.bias"])
    # Every tensor except num_batches_tracked is used, and the inverse mapping is exact.
    back = variables_to_state_dict(v, "resnet18")
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
    for k, val in back.items():
        np.testing.assert_array_equal(val, sd[k])


def test_resnet50_file_loaded_as_resnet34_names_offending_keys(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(TorchResNet("resnet50", 1000).state_dict(), path)
    with pytest.raises(ConversionError) as err:
        load_torchvision(str(path), "resnet34")
    msg = str(err.value)
    assert str(path) in msg and "arch='resnet34'" in msg
    # unexpected (bottleneck conv3 / bn3 only exist in resnet50)
    assert "unexpected keys" in msg and "layer1.0.conv3.weight" in msg and "layer1.0.bn3.running_var" in msg
    # wrongly-shaped (1x1 bottleneck conv vs 3x3 basic conv; fc in-features 2048 vs 512)
    assert "wrongly-shaped keys" in msg
    assert "layer1.0.conv1.weight file (64, 64, 1, 1) vs resnet34 (64, 64, 3, 3)" in msg
    assert "fc.weight file (1000, 2048) vs resnet34 (1000, 512)" in msg
    # missing (resnet34's layer1.0 has no downsample; resnet50's has)
    assert "layer1.0.downsample.0.weight" in msg
    assert "match resnet50" in msg
    # every offending key is listed, not just the first
    sd = torch.load(path, weights_only=True)
    table = name_table("resnet34", 1000)
    for k in sd:
        if k.endswith("num_batches_tracked"):
            continue
        if k not in table or tuple(sd[k].shape) != table[k][1]:
            assert k in msg, k


def test_missing_keys_listed_and_non_strict(tmp_path, resnet18_torch):
    sd = {k: t.numpy() for k, t in resnet18_torch.state_dict().items()}
    del sd["layer4.1.conv2.weight"], sd["bn1.running_var"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        state_dict_to_variables(sd, "resnet18", source="mem")
    msg = str(err.value)
    assert "missing keys (2)" in msg and "layer4.1.conv2.weight (512, 512, 3, 3)" in msg and "bn1.running_var" in msg
    assert "unexpected keys (1): extra.weight (3,)" in msg
    v = state_dict_to_variables(sd, "resnet18", strict=False)
    assert "conv2" not in v["params"]["body"]["layer4_1"]
    assert "var" not in v["batch_stats"]["body"]["bn1"]
    assert v["params"]["body"]["layer4_1"]["conv1"]["kernel"].shape == (3, 3, 512, 512)


def test_body_only_file_has_no_head(resnet18_torch):
    sd = {k: t.numpy() for k, t in resnet18_torch.state_dict().items() if not k.startswith("fc.")}
    v = state_dict_to_variables(sd, "resnet18")
    assert "head" not in v["params"]
    half = dict(sd, **{"fc.bias": np.zeros(5, np.float32)})
    with pytest.raises(ConversionError, match=r"missing keys \(1\): fc.weight \(5, 512\)"):
        state_dict_to_variables(half, "resnet18")


def test_unknown_arch():
    with pytest.raises(ValueError, match="resnet18"):
        state_dict_to_variables({}, "resnet9")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timm_safetensors_round_trip(tmp_path, resnet18_torch, resnet18_pth, dtype):
    # timm's plain ResNets use torchvision's names; write one as timm publishes them (safetensors).
    sd = {k: t.to(dtype) if t.is_floating_point() else t for k, t in resnet18_torch.state_dict().items()}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(sd, str(path), metadata={"format": "pt"})
    v_timm = load_timm(str(path), "resnet18")
    v_tv = load_torchvision(str(resnet18_pth), "resnet18")
    flat_t = variables_to_state_dict(v_timm, "resnet18")
    flat_v = variables_to_state_dict(v_tv, "resnet18")
    assert set(flat_t) == set(flat_v)
    for k in flat_v:
        assert flat_t[k].dtype == np.float32
        if dtype == torch.float32:
            np.testing.assert_array_equal(flat_t[k], flat_v[k])
        else:  # bfloat16 keeps 8 mantissa bits
            np.testing.assert_allclose(flat_t[k], flat_v[k], rtol=2**-8, atol=1e-30)


def test_timm_variant_is_explained(tmp_path, resnet18_torch):
    sd = {k: t.numpy() for k, t in resnet18_torch.state_dict().items()}
    sd["conv1.0.weight"] = sd.pop("conv1.weight")[:32]
    path = tmp_path / "resnet18d.safetensors"
    safetensors.numpy.save_file(sd, str(path))
    with pytest.raises(ConversionError, match="deep 3x3 stem"):
        load_timm(str(path), "resnet18")
