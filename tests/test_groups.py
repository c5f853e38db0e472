"""Layer groups, freezing labels, weight-decay mask and lr spreading (fastai's resnet split and set_hyper)."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl import groups
from jaxtl.models import create_model
from jaxtl.reference import schedules as ref


@pytest.fixture(scope="module")
def resnet34_params():
    model = create_model("resnet34", 10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return shapes["params"]


def _flat(tree):
    return {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expected_group(path: str) -> int:
    """The split written out from fastai's _resnet_split (m[0][:6] | m[0][6:] | m[1:]) for torchvision names."""
    parts = path.split("/")
    if parts[0] == "head":
        return 2
    stage = parts[1]
    if stage in ("conv1", "bn1") or stage[:6] in ("layer1", "layer2"):
        return 0
    assert stage[:6] in ("layer3", "layer4"), path
    return 1


def test_resnet34_labels_under_freeze(resnet34_params):
    labels = _flat(groups.param_labels(resnet34_params, -1, train_bn=True))
    assert len(labels) == 114  # 36 convs, 36 BNs x (scale, bias), head bn1/fc1/bn2/fc2 leaves
    for path, lab in labels.items():
        g = _expected_group(path)
        is_bn = path.split("/")[-2].endswith("bn") or path.split("/")[-2].startswith("bn")
        if g < 2 and not is_bn:
            assert lab == "frozen", path
        else:
            assert lab == f"g{g}", path
    counts = Counter(labels.values())
    assert counts == {"frozen": 36, "g0": 32, "g1": 40, "g2": 6}
    # train_bn=False: the BatchNorms of the body freeze too
    labels_nobn = _flat(groups.param_labels(resnet34_params, -1, train_bn=False))
    assert Counter(labels_nobn.values()) == {"frozen": 108, "g2": 6}


def test_resnet34_labels_freeze_to_1(resnet34_params):
    labels = _flat(groups.param_labels(resnet34_params, 1, train_bn=True))
    frozen = {p for p, lab in labels.items() if lab == "frozen"}
    # group 0 = stem + layer1 (3 blocks) + layer2 (4 blocks, one downsample): 1 + 6 + 9 = 16 convs
    assert frozen == {p for p in labels if _expected_group(p) == 0 and p.endswith("kernel")}
    assert len(frozen) == 16
    assert labels["body/layer2_3/bn2/scale"] == "g0"
    assert labels["body/layer3_0/downsample_conv/kernel"] == "g1"
    assert labels["body/layer4_2/conv2/kernel"] == "g1"
    assert labels["head/fc2/kernel"] == "g2"
    labels_nobn = _flat(groups.param_labels(resnet34_params, 1, train_bn=False))
    assert {p for p, lab in labels_nobn.items() if lab == "frozen"} == {p for p in labels if _expected_group(p) == 0}
    # unfreeze: nothing frozen, every label is the group
    unfrozen = _flat(groups.param_labels(resnet34_params, 0))
    assert all(lab == f"g{_expected_group(p)}" for p, lab in unfrozen.items())


def test_trainable_mask_matches_labels(resnet34_params):
    for n, bn in ((-1, True), (1, False), (0, True)):
        labels = _flat(groups.param_labels(resnet34_params, n, bn))
        mask = _flat(groups.trainable_mask(resnet34_params, n, bn))
        assert mask == {p: lab != "frozen" for p, lab in labels.items()}


def test_wd_mask_excludes_norm_and_bias(resnet34_params):
    mask = _flat(groups.wd_mask(resnet34_params))
    for path, decays in mask.items():
        assert decays == path.endswith("kernel"), path  # only conv/dense kernels decay in a fastai-head ResNet
    lin = create_model("resnet18", 3, head="linear")
    p = jax.eval_shape(lambda: lin.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    m = _flat(groups.wd_mask(p))
    assert m["head/fc/bias"] is False and m["head/fc/kernel"] is True


def test_generic_flax_names():
    assert groups.is_norm("encoder/LayerNorm_0/scale") and groups.is_norm(("BatchNorm_3", "bias"))
    assert not groups.is_norm("Dense_0/bias") and groups.is_norm_or_bias("Dense_0/bias")
    assert not groups.is_norm_or_bias("Dense_0/kernel") and not groups.is_norm_or_bias("embed/scale_table")


def test_path_forms_and_errors():
    kp = (jax.tree_util.DictKey("params"), jax.tree_util.DictKey("body"), jax.tree_util.DictKey("layer3_1"),
          jax.tree_util.DictKey("conv1"), jax.tree_util.DictKey("kernel"))
    assert groups.layer_group(kp) == 1
    assert groups.layer_group("body/layer1_0/bn2/bias") == 0
    assert groups.layer_group(("head", "fc", "bias")) == 2
    with pytest.raises(ValueError, match="no layer group"):
        groups.layer_group("body/fc/kernel")
    with pytest.raises(ValueError):
        groups.n_frozen(4)
    assert groups.n_frozen(-1) == 2 and groups.n_frozen(0) == 0


@pytest.mark.parametrize("lo, hi, n", [(1e-5, 1e-3, 3), (1e-6, 1e-2, 5), (3e-4, 2e-3, 2), (1e-3, 1e-3, 4)])
def test_even_mults_equals_fastcore(lo, hi, n):
    got = groups.even_mults(lo, hi, n)
    want = ref.even_mults(lo, hi, n)
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    assert got[0] == pytest.approx(lo, rel=1e-15) and got[-1] == pytest.approx(hi, rel=1e-14)
    assert groups.even_mults(lo, hi, 1) == [hi]


def test_lr_for_groups_like_set_hyper():
    np.testing.assert_allclose(groups.lr_for_groups(slice(1e-5, 1e-3)), [1e-5, 1e-4, 1e-3], rtol=1e-14)
    np.testing.assert_allclose(groups.lr_for_groups((1e-5, 1e-3)), [1e-5, 1e-4, 1e-3], rtol=1e-14)
    assert groups.lr_for_groups(slice(2e-3)) == [2e-4, 2e-4, 2e-3]
    assert groups.lr_for_groups(slice(0, 2e-3)) == [2e-4, 2e-4, 2e-3]  # fastai tests ``if v.start``
    assert groups.lr_for_groups(1e-3) == [1e-3] * 3
    assert groups.lr_for_groups(np.float32(0.5)) == [0.5] * 3
    assert groups.lr_for_groups([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    for spec in (slice(1e-5, 1e-3), slice(3e-3), 0.1):
        np.testing.assert_allclose(groups.lr_for_groups(spec, 4), ref.set_hyper_lrs(spec, 4), rtol=1e-15)
    with pytest.raises(ValueError):
        groups.lr_for_groups([1.0, 2.0])
