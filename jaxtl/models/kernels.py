"""Hardware-specific kernels for the ResNets, chosen in one place: ``kernel_set(config.model.kernels)``.

The model itself (``resnet.py``) is plain Flax: ``nn.Conv`` on ``lax.conv_general_dilated`` and a ``reduce_window``
max-pool. A :class:`KernelSet` swaps in other implementations of the same functions through the ResNet's
``conv`` (a ``ModuleDef``: ``nn.Conv`` with its ``conv_general_dilated`` replaced) and ``max_pool`` fields.
``create_model(..., kernels=)`` fills them from ``model.kernels``:

* ``"plain"``: JAX's own ops (any backend; ``jax.jvp``/``jax.vmap`` go through);
* ``"cpu"``: the XLA:CPU workarounds below (same values; gradients equal within float32 summation order);
* ``"auto"`` (default): ``"cpu"`` when JAX's default backend is the CPU, ``"plain"`` otherwise.

To add a backend's kernels, write its functions here, add a :class:`KernelSet` to :func:`kernel_set` and a name to
``KERNELS``; nothing else in jaxtl reads the backend.

The CPU set (measured on jaxlib 0.10.2, docs/performance.md):

1. Feature maps smaller than the kernel are computed as im2col + one matrix product. When a conv's input is
   spatially smaller than its kernel (layer4's 3x3 convs on a 2x2 or 1x1 map, i.e. images under 96 px), XLA's
   algebraic simplifier swaps the conv's operands, and XLA CPU then runs the swapped conv 40-100x slower than the
   same conv on a 3x3 map (2x2x512 -> 512, batch 16: 146 ms vs 3.4 ms). The same happens to the input gradient of
   a conv whose *output* is smaller than the kernel (layer4's stride-2 conv, 4x4 -> 2x2: 31 ms instead of
   ~1.5 ms), so both cases take this path. The im2col form is the same sum
   (``y[b, i, j, o] = sum_{di, dj, c} xpad[b, s*i + di, s*j + dj, c] * w[di, dj, c, o]``).
2. Every conv's input passes :func:`fusion_barrier`. XLA CPU computes a conv's weight gradient on a transposed
   copy of its input (``[C, H, W, N]``), and its fusion pass builds that copy by *recomputing* the input from the
   element-wise chain that produced it (BatchNorm apply, ReLU and, through the identity shortcuts, every earlier
   block's BatchNorm of the stage: fusions with up to 28 operands) instead of reading the materialised activation.
   The barrier makes the input an opaque value: ResNet-34 at 224 px batch 32 spends 0.26 s instead of 1.2-1.3 s
   per step in those transposes. ``lax.optimization_barrier`` does not do this on CPU (it is removed before
   fusion); a conditional is a fusion boundary that XLA keeps.
3. The input gradient of a stride-2 kxk conv (k > 1) is XLA's transposed conv, which XLA CPU runs on a
   zero-dilated copy of the output gradient (4x the positions, 3 of 4 zeros: ResNet-34's layer2 entry conv at
   224 px batch 32 took 72.7 ms for it against 23.1 ms forward). :func:`stride2_input_grad` splits it into one
   stride-1 conv per input phase (the forward's FLOPs in total) and interleaves them (72.7 -> 36.4 ms,
   docs/bench/2026-12-03/stride2_dx_per_conv.json).
4. The stem max-pool's backward: XLA CPU expands ``reduce_window``'s gradient (``select_and_scatter``) into index
   iotas, a variadic reduce-window and a scatter, 5x slower than nine selects and pads (stem pool, batch 32 at
   224 px: 399 -> 80 ms forward + backward). :func:`cpu_max_pool` keeps ``reduce_window``'s forward and takes the
   gradient of :func:`max_pool_first_max` (identical values, bitwise).

These are written by hand because no library offers them: they work around XLA:CPU's choices for these shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _explicit_pairs(padding: Any) -> list[tuple[int, int]] | None:
    if isinstance(padding, str):
        return None
    try:
        pairs = [(int(lo), int(hi)) for lo, hi in padding]
    except (TypeError, ValueError):
        return None
    return pairs if len(pairs) == 2 else None


def _dims_are_nhwc(dimension_numbers: Any) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, tuple) and all(isinstance(d, str) for d in dimension_numbers):
        return tuple(dimension_numbers) == _NHWC
    want = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return dimension_numbers == want


def im2col_conv(x: jax.Array, w: jax.Array, strides: Sequence[int], padding: Sequence[tuple[int, int]],
                precision: Any = None) -> jax.Array:
    """NHWC x ``(B, H, W, C)`` * HWIO w ``(kh, kw, C, O)`` -> ``(B, Ho, Wo, O)``, as patches ``(B, Ho, Wo, kh*kw*C)``
    (ordered ``di, dj, c`` like ``w.reshape(kh*kw*C, O)``) times the reshaped kernel."""
    kh, kw, c, o = w.shape
    (t, b), (left, r) = padding
    xp = jnp.pad(x, ((0, 0), (t, b), (left, r), (0, 0)))
    sh, sw = strides
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    cols = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
    return lax.dot_general(patches, w.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())), precision=precision)


def fusion_barrier(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` unchanged, as a value XLA cannot fuse its producers into its consumers through (see the module doc).

    Both branches return ``x`` (the second as ``x * 1.0``, so that JAX keeps two branches and XLA the
    conditional). The predicate is read off ``like`` (the conv's kernel: replicated under data parallelism, so no
    cross-device traffic) and is data-dependent so that XLA cannot fold it; whichever branch runs, values and
    gradients are exactly ``x``'s."""
    v = lax.stop_gradient(like.reshape(-1)[0])
    return lax.cond(v == v, lambda t: t, lambda t: t * 1.0, x)


def stride2_input_grad(g: jax.Array, w: jax.Array, in_hw: tuple[int, int], padding: Sequence[tuple[int, int]],
                       precision: Any = None) -> jax.Array:
    """dL/dx ``(B, H, W, C)`` of the stride-2 NHWC conv ``y = conv(x, w)``, from ``g = dL/dy`` ``(B, Ho, Wo, O)``.

    Input row ``h = 2m + r`` (phase ``r``) is reached by the taps ``d = r + p + 2e`` from output row ``m - e``
    (``p`` = low padding), so per phase ``(r, q)``::

        dx[b, 2m+r, 2n+q, c] = sum_{e, f} g[b, m-e, n-f, o] * w[r+p+2e, q+p+2f, c, o]

    a stride-1 correlation of ``g`` with a sub-kernel of ``w``. Four of them (one per phase, exactly the forward
    conv's FLOPs) are interleaved into ``dx``; XLA's own transposed conv runs on a zero-dilated ``g`` instead."""
    n, ho, wo, _ = g.shape
    kh, kw, c, _ = w.shape
    h, wd = in_hw
    mh, mw = -(-h // 2), -(-wd // 2)  # rows/cols per phase (the odd phase's extra one is sliced off below)
    rows = []
    for r in (0, 1):
        cols = []
        for q in (0, 1):
            sh, sw = (r + padding[0][0]) % 2, (q + padding[1][0]) % 2  # first tap of this phase; then every 2nd
            if sh >= kh or sw >= kw:  # no tap reaches this phase (a 1x1 kernel's odd rows/cols)
                cols.append(jnp.zeros((n, mh, mw, c), g.dtype))
                continue
            kern = w[sh::2, sw::2]  # (Th, Tw, C, O)
            th, tw = kern.shape[:2]
            lo_h, lo_w = (sh + 2 * (th - 1) - r - padding[0][0]) // 2, (sw + 2 * (tw - 1) - q - padding[1][0]) // 2
            # taps in descending e (largest e = lo): correlation index t reads g[m - e_max + t]
            kern = kern[::-1, ::-1].transpose(0, 1, 3, 2)  # (Th, Tw, O, C)
            gp = lax.pad(g, jnp.zeros((), g.dtype),
                         ((0, 0, 0), (lo_h, mh - ho - lo_h + th - 1, 0), (lo_w, mw - wo - lo_w + tw - 1, 0),
                          (0, 0, 0)))
            cols.append(lax.conv_general_dilated(gp, kern, (1, 1), "VALID", dimension_numbers=_NHWC,
                                                 precision=precision))
        rows.append(jnp.stack(cols, axis=3))  # (B, mh, mw, 2, C)
    return jnp.stack(rows, axis=2).reshape(n, 2 * mh, 2 * mw, c)[:, :h, :wd]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def stride2_conv(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...], precision: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` at stride 2 (NHWC/HWIO) whose input gradient is :func:`stride2_input_grad`
    (CPU only). The weight gradient is ``lax``'s own."""
    return _lax_stride2(x, w, padding, precision)


def _lax_stride2(x: jax.Array, w: jax.Array, padding: Any, precision: Any) -> jax.Array:
    return lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=_NHWC, precision=precision)


def _stride2_fwd(x, w, padding, precision):
    return _lax_stride2(x, w, padding, precision), (x, w)


def _stride2_bwd(padding, precision, res, g):
    x, w = res
    dw = jax.vjp(lambda w: _lax_stride2(x, w, padding, precision), w)[1](g)[0]  # its unused forward: DCE'd
    return stride2_input_grad(g, w, x.shape[1:3], padding, precision), dw


stride2_conv.defvjp(_stride2_fwd, _stride2_bwd)


def cpu_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                             lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                             dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                             *, barrier: bool = True, phase_dx: bool = True, **kwargs: Any) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` with the CPU changes 1-3 of the module doc (``barrier`` /
    ``phase_dx`` False leave out 2 / 3, for A/B benchmarks); anything else goes to ``lax`` unchanged."""
    pairs = _explicit_pairs(padding)
    plain = (feature_group_count == 1 and not kwargs and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1))))
    nhwc = lhs.ndim == 4 and pairs is not None and _dims_are_nhwc(dimension_numbers)
    if barrier and lhs.ndim == 4:
        lhs = fusion_barrier(lhs, rhs)
    if plain and nhwc:
        kh, kw = rhs.shape[0], rhs.shape[1]
        ho = (lhs.shape[1] + sum(pairs[0]) - kh) // window_strides[0] + 1
        wo = (lhs.shape[2] + sum(pairs[1]) - kw) // window_strides[1] + 1
        # input or output map smaller than the kernel: the conv (or its input-gradient conv) gets swapped
        if min(lhs.shape[1], ho) < kh or min(lhs.shape[2], wo) < kw:
            return im2col_conv(lhs, rhs, tuple(window_strides), pairs, precision)
        if phase_dx and tuple(window_strides) == (2, 2) and kh > 1 and kw > 1:
            return stride2_conv(lhs, rhs, tuple(map(tuple, pairs)), precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)


# ------------------------------------------------------------------------------------------- max-pool

def plain_max_pool(x: jax.Array) -> jax.Array:
    """torchvision's ``MaxPool2d(3, 2, padding=1)``: ``reduce_window`` over a symmetric -inf padding of 1."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def max_pool_first_max(x: jax.Array) -> jax.Array:
    """The same pool as nine strided slices of the -inf-padded input; the output takes the *first* maximum of
    each window (row-major, NaN wins), as torch and ``reduce_window``'s gradient do, so gradients go to that
    element only. Differentiable through slices and selects."""
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    taps = [lax.slice(xp, (0, i, j, 0), (n, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
            for i in range(3) for j in range(3)]
    best = lax.stop_gradient(taps[0])
    first = jnp.zeros(best.shape, jnp.int8)
    for k in range(1, 9):
        t = lax.stop_gradient(taps[k])
        better = (t > best) | jnp.isnan(t)
        best, first = jnp.where(better, t, best), jnp.where(better, jnp.int8(k), first)
    out = jnp.where(first == 0, taps[0], jnp.zeros((), x.dtype))
    for k in range(1, 9):
        out = out + jnp.where(first == k, taps[k], jnp.zeros((), x.dtype))
    return out


@jax.custom_vjp
def cpu_max_pool(x: jax.Array) -> jax.Array:
    """:func:`plain_max_pool` whose backward is :func:`max_pool_first_max`'s gradient (change 4 of the module doc;
    a ``custom_vjp``, so ``jax.jvp`` does not go through it: use the plain kernels for forward-mode AD)."""
    return plain_max_pool(x)


cpu_max_pool.defvjp(lambda x: (plain_max_pool(x), x), lambda x, g: jax.vjp(max_pool_first_max, x)[1](g))


# ------------------------------------------------------------------------------------------ selection

KERNELS = ("auto", "plain", "cpu")


@dataclass(frozen=True)
class Op:
    """A named function: its ``repr`` is the name (stable across processes, so compiled-step keys that include
    the model's ``repr`` stay valid)."""

    name: str
    fn: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class KernelSet:
    """What the ResNet's ``conv`` and ``max_pool`` fields are filled with."""

    name: str
    conv: Callable[..., nn.Module]  # a ModuleDef: nn.Conv with its conv_general_dilated chosen
    max_pool: Callable[[jax.Array], jax.Array]


def cpu_kernels(barrier: bool = True, phase_dx: bool = True, max_pool: bool = True) -> KernelSet:
    """The CPU set; the flags leave out single changes for A/B benchmarks (``scripts/bench_train.py --variant``)."""
    off = [n for n, on in (("barrier", barrier), ("phase_dx", phase_dx), ("max_pool", max_pool)) if not on]
    name = "cpu" + "".join(f"-no_{n}" for n in off)
    conv = Op(f"{name}.conv", partial(cpu_conv_general_dilated, barrier=barrier, phase_dx=phase_dx))
    pool = Op("cpu.max_pool", cpu_max_pool) if max_pool else Op("plain.max_pool", plain_max_pool)
    return KernelSet(name, partial(nn.Conv, conv_general_dilated=conv), pool)


PLAIN = KernelSet("plain", nn.Conv, Op("plain.max_pool", plain_max_pool))


def kernel_set(kernels: str | KernelSet = "auto") -> KernelSet:
    """``model.kernels`` -> the :class:`KernelSet` (``"auto"`` reads ``jax.default_backend()``). For A/B benchmarks
    also ``"cpu-no_barrier"``, ``"cpu-no_phase_dx"``, ``"cpu-no_max_pool"``: the CPU set without that change."""
    if isinstance(kernels, KernelSet):
        return kernels
    ablations = {f"cpu-no_{k}": k for k in ("barrier", "phase_dx", "max_pool")}
    if kernels in ablations:
        return cpu_kernels(**{ablations[kernels]: False})
    if kernels not in KERNELS:
        raise ValueError(f"config field model.kernels={kernels!r} is not valid; choose one of {list(KERNELS)}")
    if kernels == "auto":
        kernels = "cpu" if jax.default_backend() == "cpu" else "plain"
    return cpu_kernels() if kernels == "cpu" else PLAIN
