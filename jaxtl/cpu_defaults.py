"""jaxtl's default XLA CPU configuration: :func:`apply_cpu_defaults`, called by ``jaxtl.main`` and the benchmarks
before JAX starts its backend (``import jaxtl`` does not call it). In a notebook, call it in the first cell::

    from jaxtl.cpu_defaults import apply_cpu_defaults
    apply_cpu_defaults()

XLA reads ``XLA_FLAGS`` once, when the first backend is created (the first computation or ``jax.devices()``),
not at ``import jax``; so calling it after ``import jax`` is enough. It also quiets TensorFlow's C++ start-up
log lines (``TF_CPP_MIN_LOG_LEVEL=2`` and ``TF_ENABLE_ONEDNN_OPTS=0`` unless set): TensorFlow is only jaxtl's
input pipeline.

The one flag: ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` runs convolutions on XLA's Eigen
kernels instead of YNNPACK (dots and reductions stay on YNNPACK). On jaxlib 0.10.2 it makes the ResNet train
step 1.2-1.8x faster, with gradients at least as close to a float64 reference (docs/performance.md). Only the
CPU backend reads ``xla_cpu_*`` flags, so GPU/TPU runs are unaffected.

Not applied when: ``JAXTL_CPU_DEFAULTS=0``; ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type``
(the user's choice wins); the installed jaxlib is not a version it was measured on (XLA aborts on a flag it does
not know, so the flag is only passed to versions known to have it).
"""

from __future__ import annotations

import os
import sys

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib versions (prefixes) measured with the flag: see docs/performance.md before widening
MEASURED_JAXLIB = ("0.10.",)


def cpu_default_flags(environ: dict[str, str] | os._Environ | None = None, jaxlib_version: str | None = None) -> str:
    """The flags jaxtl adds to ``XLA_FLAGS`` under ``environ`` and ``jaxlib_version`` ('' when none)."""
    env = os.environ if environ is None else environ
    if env.get("JAXTL_CPU_DEFAULTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return ""
    if "xla_cpu_experimental_ynn_fusion_type" in env.get("XLA_FLAGS", ""):
        return ""
    if jaxlib_version is None:
        from importlib import metadata

        try:
            jaxlib_version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return ""
    if not jaxlib_version.startswith(MEASURED_JAXLIB):
        return ""
    return YNN_FLAG


def apply_cpu_defaults() -> bool:
    """Append :func:`cpu_default_flags` to ``os.environ["XLA_FLAGS"]`` unless JAX's backends already exist (then
    the flags could no longer take effect), and set ``TF_CPP_MIN_LOG_LEVEL=2`` / ``TF_ENABLE_ONEDNN_OPTS=0`` unless
    set. Returns whether flags were added."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow 2.21 prints its oneDNN banner twice at import (from two libraries, before its log level is read);
    # only TF_ENABLE_ONEDNN_OPTS=0 silences it. Its oneDNN custom ops replace TF's matmul / conv kernels, which
    # jaxtl's input pipeline (decode, resize, affine warp, casts) never runs.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    extra = cpu_default_flags()
    if not extra:
        return False
    xb = sys.modules.get("jax._src.xla_bridge")
    if xb is not None and getattr(xb, "backends_are_initialized", lambda: False)():
        return False
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()
    return True
