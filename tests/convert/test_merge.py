"""merge_pretrained: pretrained body (+ stats) into a fresh model; head kept unless linear with same classes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxtl.convert import ConversionError, load_torchvision, merge_pretrained
from jaxtl.models import create_model


def _init(arch, n, head):
    """The model and stand-in 'fresh' variables: random values in the shapes model.init would give."""
    model = create_model(arch, n, head=head)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(1)
    return model, jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.fixture(scope="module")
def pretrained(resnet18_pth):
    return load_torchvision(str(resnet18_pth), "resnet18")  # linear head with 5 classes


@jax.default_matmul_precision("highest")  # float32 convs on accelerators too
def test_fastai_head_kept_body_replaced(pretrained, resnet18_torch):
    model, init = _init("resnet18", 2, "fastai")
    merged = merge_pretrained(init, pretrained, head="fastai")
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(init)
    assert _leaves_equal(merged["params"]["body"], pretrained["params"]["body"])
    assert _leaves_equal(merged["batch_stats"]["body"], pretrained["batch_stats"]["body"])
    assert _leaves_equal(merged["params"]["head"], init["params"]["head"])
    assert _leaves_equal(merged["batch_stats"]["head"], init["batch_stats"]["head"])
    # The merged body computes torchvision's features: compare the pooled body output with torch's.
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    features = jax.jit(lambda v, x: model.apply(v, x, False, method="features"))
    feats = features(merged, jnp.asarray(x.transpose(0, 2, 3, 1)))
    tm = resnet18_torch
    with torch.no_grad():
        t = tm.maxpool(tm.relu(tm.bn1(tm.conv1(torch.from_numpy(x)))))
        t = tm.layer4(tm.layer3(tm.layer2(tm.layer1(t)))).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(feats) - t).max() / np.abs(t).max() <= 1e-4


def test_linear_head_same_classes_takes_fc(pretrained):
    _, init = _init("resnet18", 5, "linear")
    merged = merge_pretrained(init, pretrained, head="linear")
    assert _leaves_equal(merged["params"]["head"], pretrained["params"]["head"])


def test_linear_head_other_classes_keeps_init(pretrained):
    _, init = _init("resnet18", 3, "linear")
    merged = merge_pretrained(init, pretrained, head="linear")
    assert _leaves_equal(merged["params"]["head"], init["params"]["head"])
    assert _leaves_equal(merged["params"]["body"], pretrained["params"]["body"])


def test_wrong_arch_lists_problems(pretrained):
    _, init = _init("resnet34", 2, "fastai")
    with pytest.raises(ConversionError) as err:
        merge_pretrained(init, pretrained)
    msg = str(err.value)
    assert "missing (" in msg and "params/body/layer1_2/conv1/kernel" in msg and "model.arch" in msg
    _, init50 = _init("resnet50", 2, "fastai")
    with pytest.raises(ConversionError, match=r"wrongly-shaped .*params/body/layer1_0/conv1/kernel"):
        merge_pretrained(init50, pretrained)


def test_non_strict_keeps_init_for_missing(pretrained):
    _, init = _init("resnet18", 2, "fastai")
    partial = jax.tree_util.tree_map(lambda x: x, pretrained)
    del partial["params"]["body"]["layer4_1"]
    merged = merge_pretrained(init, partial, strict=False)
    assert _leaves_equal(merged["params"]["body"]["layer4_1"], init["params"]["body"]["layer4_1"])
    assert _leaves_equal(merged["params"]["body"]["layer1_0"], pretrained["params"]["body"]["layer1_0"])
    with pytest.raises(ValueError, match="head"):
        merge_pretrained(init, pretrained, head="mlp")


def test_init_with_pretrained_equals_merge_into_a_full_init():
    """The fast path (body shapes only, head initialised alone) gives exactly model.init + merge_pretrained."""
    from jaxtl.convert import init_with_pretrained
    from jaxtl.models import create_model

    for head in ("fastai", "linear"):
        model = create_model("resnet18", 3, head)
        key = jax.random.PRNGKey(7)
        # jitted like the Learner's init (eager and jitted random init may differ in the last bit)
        full = jax.jit(lambda k, m=model: m.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(key)
        pre = jax.tree_util.tree_map(lambda x: x + 1.0, {c: {"body": full[c]["body"]} for c in full})
        fast = init_with_pretrained(model, key, pre, head, sample_size=32)
        ref = merge_pretrained(full, pre, head)
        assert jax.tree_util.tree_structure(fast) == jax.tree_util.tree_structure(ref)
        for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(ref), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_with_pretrained_rejects_a_body_of_another_arch():
    from jaxtl.convert import init_with_pretrained
    from jaxtl.models import create_model

    r34 = create_model("resnet34", 2)
    r18 = create_model("resnet18", 2)
    pre = r18.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    with pytest.raises(ConversionError, match="missing"):
        init_with_pretrained(r34, jax.random.PRNGKey(0), pre, "fastai", sample_size=32)
