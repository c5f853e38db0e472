"""Engine-level tests of the pure train / eval steps (tiny ResNet-18, 32 px, batch 4)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl import metrics
from jaxtl.groups import trainable_mask
from jaxtl.models import create_model
from jaxtl.train import TrainState, body_is_frozen, make_eval_step, make_predict_step, make_train_step

B, S, C = 4, 32, 3


@pytest.fixture(scope="module")
def setup():
    model = create_model("resnet18", C, "fastai")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, S, S, 3)), train=False)
    rs = np.random.RandomState(0)
    batches = [{"image": rs.randn(B, S, S, 3).astype(np.float32), "label": rs.randint(0, C, B).astype(np.int32)}
               for _ in range(3)]
    return model, variables, batches


def masked_adam(mask, lr=1e-2):
    # weight decay on every trainable leaf so that a frozen leaf leaking into the update would move
    return optax.masked(optax.adamw(lr, weight_decay=0.1), mask)


def run_steps(model, variables, batches, mask, **kw):
    tx = masked_adam(mask)
    state = TrainState.create(variables["params"], variables["batch_stats"], tx, jax.random.PRNGKey(1))
    step = jax.jit(make_train_step(model, tx, mask, **kw))
    losses = []
    for b in batches:
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return state, losses


def leaves_with_paths(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("train_bn", [True, False])
def test_frozen_leaves_bit_identical_trainable_move(setup, train_bn):
    model, variables, batches = setup
    params = variables["params"]
    mask = trainable_mask(params, -1, train_bn)  # freeze(): only the head (+ BN when train_bn) trains
    state, losses = run_steps(model, variables, batches, mask)
    assert all(np.isfinite(losses))
    before, after = leaves_with_paths(params), leaves_with_paths(state.params)
    flags = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    n_frozen = n_moved = 0
    for k, m in flags.items():
        if m:
            assert not np.array_equal(before[k], after[k]), f"trainable {k} did not move"
            n_moved += 1
        else:
            assert before[k].tobytes() == after[k].tobytes(), f"frozen {k} changed"
            n_frozen += 1
    assert n_frozen > 0 and n_moved > 0
    bn_scale = "['body']['layer1_0']['bn1']['scale']"
    assert flags[bn_scale] is train_bn


@pytest.mark.parametrize("train_bn", [True, False])
def test_running_stats_move_in_frozen_body(setup, train_bn):
    """fastai keeps frozen BatchNorm layers in train mode: running statistics update even when frozen."""
    model, variables, batches = setup
    mask = trainable_mask(variables["params"], -1, train_bn)
    state, _ = run_steps(model, variables, batches[:1], mask)
    for name in ("bn1", "layer1_0"):
        before = jax.tree.leaves(variables["batch_stats"]["body"][name])
        after = jax.tree.leaves(state.batch_stats["body"][name])
        assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_frozen_body_split_matches_full_graph_and_skips_body_backward(setup):
    """freeze() with train_bn=False: the body runs forward only (no conv in the backward pass)."""
    model, variables, batches = setup
    mask = trainable_mask(variables["params"], -1, False)
    assert body_is_frozen(mask)
    s_split, l_split = run_steps(model, variables, batches[:2], mask)
    s_full, l_full = run_steps(model, variables, batches[:2], mask, split_frozen_body=False)
    np.testing.assert_allclose(l_split, l_full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s_split.params), jax.tree.leaves(s_full.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def n_convs(m):
        tx = masked_adam(m)
        state = TrainState.create(variables["params"], variables["batch_stats"], tx, jax.random.PRNGKey(1))
        hlo = jax.jit(make_train_step(model, tx, m)).lower(state, batches[0]).as_text()
        # convs on maps smaller than the kernel are im2col matmuls on CPU (jaxtl/models/kernels.py): dot_generals
        # with a 4-D operand, which the head's (2-D) matmuls never have
        im2col = len(re.findall(r"stablehlo\.dot_general .*: \(tensor<\d+x\d+x\d+x\d+x", hlo))
        return hlo.count("stablehlo.convolution") + im2col

    n_body_convs = 1 + 8 * 2 + 3  # stem + 8 basic blocks x 2 + 3 downsample convs
    # on CPU, layer2_0.conv1 (8x8 -> 4x4, stride 2; the later stride-2 convs are im2col at 32 px) computes its
    # input gradient as 4 phase convs instead of 1 (jaxtl/models/kernels.py::stride2_input_grad)
    phase = 3 if jax.default_backend() == "cpu" else 0  # the model is create_model's default (kernels="auto")
    assert n_convs(mask) == n_body_convs  # forward only
    # freeze() with train_bn: input gradients through the body (for its BN params), no conv weight gradients
    assert n_convs(trainable_mask(variables["params"], -1, True)) == 2 * n_body_convs - 1 + phase
    # unfrozen: forward + input gradients (none for the image) + weight gradients
    assert n_convs(trainable_mask(variables["params"], 0, True)) == 3 * n_body_convs - 1 + phase


def test_eval_step_masks_padding(setup):
    model, variables, batches = setup
    b = dict(batches[0])
    b["mask"] = np.array([True, True, True, False])
    sums = jax.jit(make_eval_step(model))(variables, b)
    logits = np.asarray(model.apply(variables, b["image"], False))
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - logits[np.arange(B), b["label"]]
    keep = b["mask"]
    np.testing.assert_allclose(float(sums["loss"]), ce[keep].sum(), rtol=1e-5)
    assert float(sums["count"]) == 3.0
    assert float(sums["correct"]) == float((logits.argmax(-1) == b["label"])[keep].sum())
    assert "top5" not in sums  # 3 classes: top-5 is meaningless
    probs = jax.jit(make_predict_step(model))(variables, b["image"])
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_top5_and_summary():
    logits = jnp.array([[9.0, 8, 7, 6, 5, 4, 3], [0, 1, 2, 3, 4, 5, 6]])
    labels = jnp.array([5, 1])  # row 0: rank 5 -> not top-5; row 1: rank 5 -> not top-5
    s = metrics.eval_sums(logits, labels, jnp.array([True, True]))
    assert float(s["top5"]) == 0.0
    s = metrics.eval_sums(logits, jnp.array([4, 2]), jnp.array([True, False]))
    assert float(s["top5"]) == 1.0 and float(s["count"]) == 1.0
    summ = metrics.summarize({"loss": 3.0, "correct": 3.0, "count": 4.0, "top5": 4.0})
    assert summ == {"valid_loss": 0.75, "error_rate": 0.25, "accuracy": 0.75, "top_5_accuracy": 1.0}


def test_smooth_loss_matches_fastai_formula():
    sl = metrics.SmoothLoss()
    vals = [2.0, 1.0, 3.0]
    out = [sl.update(v) for v in vals]
    # fastai AvgSmoothLoss: val = lerp(loss, val, 0.98); value = val / (1 - 0.98**count)
    v = 0.0
    for i, x in enumerate(vals):
        v = x + 0.98 * (v - x)
        assert out[i] == pytest.approx(v / (1 - 0.98 ** (i + 1)))


def test_bfloat16_compute_keeps_float32_params_and_opt_state(setup):
    _, variables, batches = setup
    model = create_model("resnet18", C, "fastai", dtype=jnp.bfloat16)
    mask = trainable_mask(variables["params"], 0, True)
    state, losses = run_steps(model, variables, batches[:1], mask)
    assert np.isfinite(losses[0])
    for x in jax.tree.leaves((state.params, state.opt_state, state.batch_stats)):
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert x.dtype == jnp.float32


def test_jvp_and_vmap_through_the_plain_model_train_step():
    """With model.kernels="plain" the full train step is plain JAX: forward-mode AD through it (the change of the
    updated parameters along a tangent of the input parameters, checked against a finite difference) and vmap over
    a stack of batches (equal to running each batch alone)."""
    model = create_model("resnet18", C, "fastai", head_dropout=0.0, kernels="plain")
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, S, S, 3)), train=False)
    rs = np.random.RandomState(1)
    batches = [{"image": rs.randn(B, S, S, 3).astype(np.float32), "label": rs.randint(0, C, B).astype(np.int32)}
               for _ in range(2)]
    mask = trainable_mask(v["params"], 0, True)
    tx = optax.sgd(1e-2)
    state = TrainState.create(v["params"], v["batch_stats"], tx, jax.random.PRNGKey(1))
    step = make_train_step(model, tx, mask)
    head = lambda p: p["head"]["fc2"]["kernel"]
    new_head = lambda p: head(step(state.replace(params=p), batches[0])[0].params)
    t = jax.tree.map(jnp.zeros_like, v["params"])
    t["head"]["fc2"]["kernel"] = jnp.ones_like(head(v["params"]))
    with jax.default_matmul_precision("highest"):
        _, tangent = jax.jvp(new_head, (v["params"],), (t,))
        eps = 1e-3
        bumped = jax.tree.map(lambda p, d: p + eps * d, v["params"], t)
        fd = (new_head(bumped) - new_head(v["params"])) / eps
    np.testing.assert_allclose(tangent, fd, atol=2e-2 * float(jnp.abs(fd).max()))  # float32 finite difference
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    losses = jax.vmap(lambda b: step(state, b)[1]["loss"])(stacked)
    np.testing.assert_allclose(losses, [step(state, b)[1]["loss"] for b in batches], rtol=1e-5)


def test_precision_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    from jaxtl.train import PRECISIONS, compute_dtype

    assert compute_dtype("auto", "cpu") == jnp.float32
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert compute_dtype("auto", backend) == jnp.bfloat16
    assert compute_dtype("float32", "tpu") == jnp.float32 and compute_dtype("bfloat16", "cpu") == jnp.bfloat16
    assert compute_dtype("auto") == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    assert set(PRECISIONS) == {"auto", "float32", "bfloat16"}
