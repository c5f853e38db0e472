"""The ResNets' conv: im2col for maps smaller than the kernel (CPU) equals lax.conv_general_dilated, values and
gradients; larger maps keep XLA's convolution; the fusion barrier before every conv changes no value and stops XLA
from recomputing conv inputs inside the weight gradient's transposes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import jaxprs_in_params

from jaxtl.models.conv import conv_general_dilated, fusion_barrier, im2col_conv

DN = ("NHWC", "HWIO", "NHWC")
# (input side, Cin, Cout, kernel, stride): layer4 on 64 px and 32 px images, layer4's stride-2 conv, a stem on a
# tiny image, and non-square maps
CASES = [(2, 16, 8, 3, 1), (1, 16, 8, 3, 1), (4, 8, 16, 3, 2), (3, 3, 8, 7, 2), (5, 4, 4, 7, 2), ((2, 5), 8, 8, 3, 1)]


def _ref(x, w, s, p):
    return lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=DN,
                                    precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("hw,cin,cout,k,s", CASES)
def test_im2col_matches_lax_conv_values_and_gradients(hw, cin, cout, k, s):
    h, w_ = (hw, hw) if isinstance(hw, int) else hw
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, h, w_, cin)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))
    p = k // 2
    ours = lambda x, w: conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=DN)
    y, y_ref = ours(x, w), _ref(x, w, s, p)
    assert y.shape == y_ref.shape
    scale = float(jnp.abs(y_ref).max())
    np.testing.assert_allclose(y, y_ref, atol=1e-5 * scale, rtol=0)  # float32 sums in another order
    np.testing.assert_allclose(im2col_conv(x, w, (s, s), ((p, p), (p, p))), y_ref, atol=1e-5 * scale, rtol=0)
    r = jnp.asarray(rng.normal(size=y_ref.shape).astype(np.float32))
    g = jax.grad(lambda x, w: (ours(x, w) * r).sum(), argnums=(0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: (_ref(x, w, s, p) * r).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=0)


def test_fusion_barrier_is_the_identity_for_values_and_gradients():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)).astype(np.float32))
    like = jnp.asarray([np.nan, 1.0], jnp.float32)  # NaN predicate: the other branch runs, still the identity
    r = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    for k in (x[0, 0, 0], like):
        np.testing.assert_array_equal(jax.jit(fusion_barrier)(x, k), x)
        g = jax.jit(jax.grad(lambda x, k: (fusion_barrier(x, k) * r).sum()))(x, k)
        np.testing.assert_array_equal(g, r)


def _transposed_input_fusions(monkeypatch, barrier: str, batch: int = 4) -> list[int]:
    """Operand counts of the compiled gradient's fusions that build a conv input in ``[C, H, W, N]`` layout."""
    from jaxtl.models import create_model

    monkeypatch.setenv("JAXTL_CONV_BARRIER", barrier)  # read when the model is traced
    m = create_model("resnet18", 3, "fastai", head_dropout=0.0)
    x = jnp.asarray(np.random.default_rng(0).random((batch, 64, 64, 3)), jnp.float32)
    v = m.init(jax.random.PRNGKey(0), x[:1], train=False)

    def loss(p):
        y, _ = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        return (y ** 2).sum()

    hlo = jax.jit(jax.grad(loss)).lower(v["params"]).compile().as_text()
    fusion = re.compile(r"\s*%\S+ = f32\[(\d+),\d+,\d+,(\d+)\]\S* fusion\((.*?)\), kind")
    return [m.group(3).count("%") for m in map(fusion.match, hlo.splitlines())
            if m and int(m.group(2)) == batch and int(m.group(1)) != batch]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the barrier is applied on the CPU backend only")
def test_weight_gradient_transposes_read_the_stored_conv_input(monkeypatch):
    """With the barrier each transposed conv input is a copy of one buffer; without it XLA recomputes the BatchNorm /
    ReLU / shortcut chain inside the transpose (that case is checked too, so the test can tell them apart)."""
    with_barrier = _transposed_input_fusions(monkeypatch, "1")
    assert with_barrier and max(with_barrier) == 1, with_barrier
    without = _transposed_input_fusions(monkeypatch, "0")
    assert max(without) > 3, f"XLA no longer recomputes conv inputs ({without}): re-measure the barrier's use"


def test_conv_values_and_gradients_do_not_depend_on_the_barrier(monkeypatch):
    from jaxtl.models import create_model

    m = create_model("resnet18", 3, "fastai", head_dropout=0.0)
    x = jnp.asarray(np.random.default_rng(3).random((2, 40, 40, 3)), jnp.float32)
    v = m.init(jax.random.PRNGKey(0), x[:1], train=False)

    def grads(flag):
        monkeypatch.setenv("JAXTL_CONV_BARRIER", flag)
        f = lambda p: (m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                               mutable=["batch_stats"])[0] ** 2).sum()
        return jax.jit(jax.value_and_grad(f))(v["params"])

    (l1, g1), (l0, g0) = grads("1"), grads("0")
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):  # fusion may reorder float32 sums
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()) + 1e-12)


def _primitives(h, k, s):
    x = jnp.zeros((2, h, h, 8))
    w = jnp.zeros((k, k, 8, 8))
    f = lambda x, w: conv_general_dilated(x, w, (s, s), ((k // 2, k // 2),) * 2, dimension_numbers=DN)
    return _names(jax.make_jaxpr(f)(x, w).jaxpr)


def _names(jaxpr) -> set[str]:
    """Primitive names in a jaxpr, including those inside custom_vjp calls and other sub-jaxprs."""
    out = set()
    for e in jaxpr.eqns:
        out.add(e.primitive.name)
        for sub in jaxprs_in_params(e.params):
            out |= _names(sub)
    return out


def test_small_maps_take_the_matmul_path_and_large_maps_keep_the_conv():
    assert "conv_general_dilated" not in _primitives(2, 3, 1) and "dot_general" in _primitives(2, 3, 1)
    assert "conv_general_dilated" not in _primitives(4, 3, 2)  # output 2x2 < kernel: its input gradient swaps
    assert _primitives(8, 3, 1) & {"conv_general_dilated"} and "dot_general" not in _primitives(8, 3, 1)
    assert "conv_general_dilated" in _primitives(14, 3, 2)


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (1, 8, 6, 2), (2, 1, 1, 2)])
def test_stem_max_pool_values_and_gradients_equal_reduce_window_bitwise(shape):
    """The custom backward (first maximum of each window gets the gradient) is reduce_window's, ties included."""
    import flax.linen as nn

    from jaxtl.models.resnet import max_pool_3x3_s2

    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)  # ReLU output: many tied zeros
    x[0, 0, :, 0] = 2.0  # ties at a positive value
    x = jnp.asarray(x)
    ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(max_pool_3x3_s2(x), ref(x))
    r = jnp.asarray(rng.normal(size=ref(x).shape).astype(np.float32))
    g = jax.jit(jax.grad(lambda x: (max_pool_3x3_s2(x) * r).sum()))(x)
    g_ref = jax.jit(jax.grad(lambda x: (ref(x) * r).sum()))(x)
    np.testing.assert_array_equal(g, g_ref)


# (input H, W, Cin, Cout, kernel): ResNet's stride-2 3x3 convs on even and odd maps, a non-square map, the stem,
# a 1x1 kernel (its odd phases get no tap)
STRIDE2 = [(8, 8, 4, 6, 3), (7, 7, 3, 5, 3), (16, 11, 4, 4, 3), (9, 7, 3, 4, 7), (5, 5, 2, 2, 5), (9, 6, 4, 2, 1)]


@pytest.mark.parametrize("h,w_,cin,cout,k", STRIDE2)
def test_stride2_conv_input_gradient_by_phases_matches_lax(h, w_, cin, cout, k):
    """The stride-2 conv's input gradient computed phase by phase equals lax's transposed conv (float32 sums in
    another order: 1e-5 of the largest entry), and the conv's value and weight gradient are unchanged."""
    from jaxtl.models.conv import stride2_conv, stride2_input_grad

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, h, w_, cin)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))
    p = k // 2
    pad = ((p, p), (p, p))
    y_ref, vjp = jax.vjp(lambda x, w: _ref(x, w, 2, p), x, w)
    r = jnp.asarray(rng.normal(size=y_ref.shape).astype(np.float32))
    dx_ref, dw_ref = vjp(r)
    dx = stride2_input_grad(r, w, (h, w_), pad, lax.Precision.HIGHEST)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, dx_ref, atol=1e-5 * float(jnp.abs(dx_ref).max()), rtol=0)
    y, vjp2 = jax.vjp(lambda x, w: stride2_conv(x, w, pad, lax.Precision.HIGHEST), x, w)
    np.testing.assert_array_equal(y, y_ref)
    dx2, dw2 = vjp2(r)
    np.testing.assert_allclose(dx2, dx_ref, atol=1e-5 * float(jnp.abs(dx_ref).max()), rtol=0)
    np.testing.assert_array_equal(dw2, dw_ref)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the phase input gradient is used on the CPU backend only")
def test_stride2_convs_take_the_phase_gradient_and_others_do_not(monkeypatch):
    """ResNet's stride-2 kxk convs (k > 1) use it, 1x1 shortcut convs and stride-1 convs keep lax's own;
    JAXTL_PHASE_DX=0 (for A/B benchmarks) turns it off."""
    assert "custom_vjp_call" in _primitives(14, 3, 2)
    assert "custom_vjp_call" not in _primitives(14, 1, 2) and "custom_vjp_call" not in _primitives(8, 3, 1)
    monkeypatch.setenv("JAXTL_PHASE_DX", "0")
    assert "custom_vjp_call" not in _primitives(14, 3, 2)
