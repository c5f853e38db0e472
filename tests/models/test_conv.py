"""The ResNets' conv: im2col for maps smaller than the kernel (CPU) equals lax.conv_general_dilated, values and
gradients; larger maps keep XLA's convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxtl.models.conv import conv_general_dilated, im2col_conv

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


def _primitives(h, k, s):
    x = jnp.zeros((2, h, h, 8))
    w = jnp.zeros((k, k, 8, 8))
    f = lambda x, w: conv_general_dilated(x, w, (s, s), ((k // 2, k // 2),) * 2, dimension_numbers=DN)
    return {e.primitive.name for e in jax.make_jaxpr(f)(x, w).jaxpr.eqns}


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
