"""jaxtl/models/kernels.py: the CPU kernel set equals JAX's plain ops. im2col for maps smaller than the kernel equals
lax.conv_general_dilated, values and gradients; larger maps keep XLA's convolution; the fusion barrier before every
conv changes no value and stops XLA from recomputing conv inputs inside the weight gradient's transposes; the
stride-2 phase input gradient and the max-pool backward equal lax's; the model is plain unless asked."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import jaxprs_in_params

from jaxtl.models.kernels import cpu_conv_general_dilated as conv_general_dilated
from jaxtl.models.kernels import fusion_barrier, im2col_conv

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


def _transposed_input_fusions(kernels: str, batch: int = 4) -> list[int]:
    """Operand counts of the compiled gradient's fusions that build a conv input in ``[C, H, W, N]`` layout."""
    from jaxtl.models import create_model

    m = create_model("resnet18", 3, "fastai", head_dropout=0.0, kernels=kernels)
    x = jnp.asarray(np.random.default_rng(0).random((batch, 64, 64, 3)), jnp.float32)
    v = m.init(jax.random.PRNGKey(0), x[:1], train=False)

    def loss(p):
        y, _ = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        return (y ** 2).sum()

    hlo = jax.jit(jax.grad(loss)).lower(v["params"]).compile().as_text()
    fusion = re.compile(r"\s*%\S+ = f32\[(\d+),\d+,\d+,(\d+)\]\S* fusion\((.*?)\), kind")
    return [m.group(3).count("%") for m in map(fusion.match, hlo.splitlines())
            if m and int(m.group(2)) == batch and int(m.group(1)) != batch]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion behaviour")
def test_weight_gradient_transposes_read_the_stored_conv_input():
    """With the barrier each transposed conv input is a copy of one buffer; without it XLA recomputes the BatchNorm /
    ReLU / shortcut chain inside the transpose (that case is checked too, so the test can tell them apart)."""
    with_barrier = _transposed_input_fusions("cpu")
    assert with_barrier and max(with_barrier) == 1, with_barrier
    without = _transposed_input_fusions("cpu-no_barrier")
    assert max(without) > 3, f"XLA no longer recomputes conv inputs ({without}): re-measure the barrier's use"


@pytest.mark.parametrize("kernels", ["cpu", "cpu-no_barrier", "cpu-no_phase_dx", "cpu-no_max_pool"])
def test_cpu_kernels_equal_plain_in_values_and_gradients(kernels):
    """The whole model (ResNet-18, 40 px: im2col in layer4, phase gradients in layer2/3, the pool backward) with
    each CPU set equals the plain model: loss to 1e-6 relative, every gradient to 1e-5 of its largest entry
    (float32 sums in another order), BatchNorm statistics likewise. Linear head and batch 4: the fastai head's
    BatchNorm over 2 examples amplifies float32 rounding of the body 100-fold (2.5e-3 measured), which would hide
    nothing but make the comparison loose."""
    from jaxtl.models import create_model

    x = jnp.asarray(np.random.default_rng(3).random((4, 40, 40, 3)), jnp.float32)

    def run(k):
        m = create_model("resnet18", 3, "linear", kernels=k)
        v = m.init(jax.random.PRNGKey(0), x[:1], train=False)

        def f(p):
            y, upd = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
            return (y ** 2).sum(), upd
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.value_and_grad(f, has_aux=True))(v["params"])

    (l1, s1), g1 = run(kernels)
    (l0, s0), g0 = run("plain")
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g0, s0)), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()) + 1e-12)


def _primitives(h, k, s, **kw):
    x = jnp.zeros((2, h, h, 8))
    w = jnp.zeros((k, k, 8, 8))
    f = lambda x, w: conv_general_dilated(x, w, (s, s), ((k // 2, k // 2),) * 2, dimension_numbers=DN, **kw)
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

    from jaxtl.models.kernels import cpu_max_pool as max_pool_3x3_s2

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
    from jaxtl.models.kernels import stride2_conv, stride2_input_grad

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


def test_stride2_convs_take_the_phase_gradient_and_others_do_not():
    """ResNet's stride-2 kxk convs (k > 1) use it, 1x1 shortcut convs and stride-1 convs keep lax's own;
    phase_dx=False (the cpu-no_phase_dx set, for A/B benchmarks) turns it off."""
    assert "custom_vjp_call" in _primitives(14, 3, 2)
    assert "custom_vjp_call" not in _primitives(14, 1, 2) and "custom_vjp_call" not in _primitives(8, 3, 1)
    assert "custom_vjp_call" not in _primitives(14, 3, 2, phase_dx=False)


def test_kernel_sets_and_auto():
    from jaxtl.models import create_model, kernel_set

    assert kernel_set("plain").name == "plain" and kernel_set("cpu").name == "cpu"
    assert kernel_set("auto").name == ("cpu" if jax.default_backend() == "cpu" else "plain")
    assert kernel_set("cpu-no_barrier").name == "cpu-no_barrier"
    with pytest.raises(ValueError, match="model.kernels='gpu'.*'auto', 'plain', 'cpu'"):
        kernel_set("gpu")
    plain = create_model("resnet18", 3, kernels="plain")
    assert plain.conv is nn.Conv and "plain.max_pool" in repr(plain)  # JAX's own ops
    assert "cpu.conv" in repr(create_model("resnet18", 3, kernels="cpu"))  # stable reprs (compiled-step keys)


def _train_loss(kernels: str):
    from jaxtl.models import create_model

    m = create_model("resnet18", 3, "linear", kernels=kernels)
    x = jnp.asarray(np.random.default_rng(5).random((2, 32, 32, 3)), jnp.float32)
    v = m.init(jax.random.PRNGKey(0), x[:1], train=False)

    def loss(p, x):
        y, _ = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        return (y ** 2).mean()
    return loss, v["params"], x


def test_plain_model_supports_jvp_and_vmap():
    """Forward-mode AD and vmap go through the plain model (the CPU max-pool is a custom_vjp: jvp fails there)."""
    loss, p, x = _train_loss("plain")
    t = jax.tree.map(jnp.ones_like, p)
    val, tan = jax.jvp(lambda p: loss(p, x), (p,), (t,))
    g = jax.grad(loss)(p, x)
    np.testing.assert_allclose(tan, sum(float((a * b).sum()) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(t),
                                                                                strict=True)), rtol=1e-3)
    per_example = jax.vmap(lambda xi: loss(p, xi[None]))(x)
    np.testing.assert_allclose(per_example, [loss(p, x[:1]), loss(p, x[1:])], rtol=1e-5)
    cpu_loss, p2, _ = _train_loss("cpu")
    with pytest.raises(TypeError):
        jax.jvp(lambda p: cpu_loss(p, x), (p2,), (t,))
