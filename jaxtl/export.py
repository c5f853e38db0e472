"""A portable export of a finished run: ``python -m jaxtl.predict --workdir W --export DIR``.

Writes ``DIR/model.jax``, a serialised ``jax.export`` artifact (StableHLO with the weights as constants; lowered
for ``cpu`` and ``cuda``) of ``probs = f(pixels)``: ``pixels`` uint8 ``(N, S, S, 3)`` (any N) -> normalisation
with the run's mean/std -> the model in eval mode (float32, plain kernels) -> softmax ``(N, C)`` float32; and
``DIR/model.json``: the class names and the input spec (size, dtype, mean, std and how the pixels are made: the
validation transform, squish to ``resize`` square then the centre ``size`` crop). Loading needs ``jax`` and
``numpy`` only -- no jaxtl, no pickle::

    import json, numpy as np
    from jax import export
    exported = export.deserialize(open("DIR/model.jax", "rb").read())
    spec = json.load(open("DIR/model.json"))
    probs = np.asarray(exported.call(pixels))      # pixels: uint8 (N, size, size, 3)
    labels = [spec["classes"][i] for i in probs.argmax(-1)]

``jax.export`` (not a hand-written format) keeps the artifact loadable by later JAX versions (its serialisation
is versioned and kept backward compatible for 6 months or more, per the JAX docs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXPORT_FILE, SPEC_FILE = "model.jax", "model.json"
PLATFORMS = ("cpu", "cuda")


def export_model(out_dir: str | os.PathLike, model: Any, variables: dict[str, Any], classes: Sequence[str],
                 size: int, mean: Sequence[float], std: Sequence[float],
                 platforms: Sequence[str] = PLATFORMS) -> dict[str, Path]:
    """Write ``model.jax`` and ``model.json`` (module docstring) into ``out_dir``; returns their paths.
    ``model`` is rebuilt with the plain kernels (the artifact runs on any backend)."""
    import jax
    import jax.numpy as jnp
    from jax import export

    from jaxtl.data.augment import eval_size
    from jaxtl.models.kernels import kernel_set

    plain = kernel_set("plain")
    model = model.clone(conv=plain.conv, max_pool=plain.max_pool, dtype=jnp.float32)
    consts = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float32), jax.device_get(dict(variables)))
    m = jnp.asarray(mean, jnp.float32)
    s = jnp.asarray(std, jnp.float32)

    def probs(pixels: jax.Array) -> jax.Array:
        x = (pixels.astype(jnp.float32) / 255.0 - m) / s
        return jax.nn.softmax(model.apply(consts, x, False).astype(jnp.float32), axis=-1)

    arg = jax.ShapeDtypeStruct(export.symbolic_shape(f"n, {size}, {size}, 3"), jnp.uint8)
    exported = export.export(jax.jit(probs), platforms=tuple(platforms))(arg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / EXPORT_FILE, "spec": out / SPEC_FILE}
    paths["model"].write_bytes(exported.serialize())
    spec = {"classes": list(classes), "platforms": list(exported.platforms),
            "input": {"shape": ["N", size, size, 3], "dtype": "uint8", "size": size, "mean": list(map(float, mean)),
                      "std": list(map(float, std)),
                      "pixels": f"the validation transform: RGB, squish to {eval_size(size)} x {eval_size(size)} "
                                f"(antialiased bilinear), then the centre {size} x {size} crop"},
            "output": {"shape": ["N", len(classes)], "dtype": "float32", "meaning": "softmax probabilities"}}
    paths["spec"].write_text(json.dumps(spec, indent=2) + "\n")
    return paths
