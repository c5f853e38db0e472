"""torchvision / timm ResNet state-dict names <-> jaxtl's variable tree.

The expected names and shapes are derived from jaxtl's own model (``jax.eval_shape`` of
``create_model(arch, n, head="linear").init``), so the table can never drift from the module::

    conv1.weight (O, I, kh, kw)          -> params/body/conv1/kernel (kh, kw, I, O)       [OIHW -> HWIO]
    bn1.weight / bn1.bias                -> params/body/bn1/scale / bias
    bn1.running_mean / running_var       -> batch_stats/body/bn1/mean / var
    layer{i}.{j}.conv{k} / bn{k}         -> .../body/layer{i}_{j}/conv{k} / bn{k}
    layer{i}.{j}.downsample.0 / .1       -> .../body/layer{i}_{j}/downsample_conv / downsample_bn
    fc.weight (out, in) / fc.bias        -> params/head/fc/kernel (in, out) / bias          [linear head]
    *.num_batches_tracked                -> ignored

timm's plain ResNets (``resnet50.a1_in1k``, ``resnet18.tv_in1k``, ...) use exactly these names.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxtl.models import ARCHS

# jaxtl leaf name -> torch suffix, per collection.
_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
         ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}

Variables = dict[str, Any]


class ConversionError(ValueError):
    """A state dict does not match the requested architecture (all problems listed in the message)."""


def _torch_module_name(segment: str) -> str:
    if segment.startswith("layer") and "_" in segment:
        stage, block = segment.split("_", 1)
        return f"{stage}.{block}"
    return {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(segment, segment)


@functools.cache
def name_table(arch: str, num_classes: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
    """``{torch_name: (jaxtl path, torch shape, kind)}`` for ``arch`` with a linear head of ``num_classes``.

    ``kind`` is ``conv`` (OIHW <-> HWIO), ``dense`` (transpose) or ``vector``.
    """
    import jax
    import jax.numpy as jnp

    from jaxtl.models import create_model

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not known; choose one of {sorted(ARCHS)}")
    model = create_model(arch, num_classes, head="linear")
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    table: dict[str, tuple[tuple[str, ...], tuple[int, ...], str]] = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        path = tuple(k.key for k in key_path)
        collection, part, *modules, leaf_name = path
        if part == "head":
            modules = []  # params/head/fc/... -> torchvision's top-level "fc"
            module = "fc"
        else:
            module = ".".join(_torch_module_name(m) for m in modules)
        torch_name = f"{module}.{_LEAF[(collection, leaf_name)]}"
        shape = tuple(leaf.shape)
        if leaf_name == "kernel" and len(shape) == 4:
            kind, torch_shape = "conv", (shape[3], shape[2], shape[0], shape[1])
        elif leaf_name == "kernel":
            kind, torch_shape = "dense", (shape[1], shape[0])
        else:
            kind, torch_shape = "vector", shape
        table[torch_name] = (path, torch_shape, kind)
    return table


# torch layout -> jaxtl layout: conv (O, I, H, W) -> (H, W, I, O), dense (out, in) -> (in, out)
_TO_JAXTL = {"conv": (2, 3, 1, 0), "dense": (1, 0)}


def _to_jaxtl(value: np.ndarray, kind: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float32)
    return np.ascontiguousarray(value.transpose(_TO_JAXTL[kind]) if kind in _TO_JAXTL else value)


def _to_torch(value: Any, kind: str) -> np.ndarray:
    """The inverse of :func:`_to_jaxtl`."""
    value = np.asarray(value, dtype=np.float32)
    return np.ascontiguousarray(value.transpose(np.argsort(_TO_JAXTL[kind])) if kind in _TO_JAXTL else value)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return str(tuple(int(d) for d in shape))


def _head_classes(sd: Mapping[str, np.ndarray]) -> int | None:
    if "fc.weight" in sd and np.ndim(sd["fc.weight"]) == 2:
        return int(np.shape(sd["fc.weight"])[0])
    if "fc.bias" in sd and np.ndim(sd["fc.bias"]) == 1:
        return int(np.shape(sd["fc.bias"])[0])
    return None


def _problems(sd: Mapping[str, np.ndarray], arch: str) -> tuple[list[str], list[str], list[str], dict]:
    n = _head_classes(sd)
    table = name_table(arch, n or 1)
    if n is None and "fc.weight" not in sd and "fc.bias" not in sd:
        table = {k: v for k, v in table.items() if not k.startswith("fc.")}  # body-only file
    missing = [k for k in table if k not in sd]
    unexpected = [k for k in sd if k not in table]
    wrong = [k for k in table if k in sd and tuple(np.shape(sd[k])) != table[k][1]]
    return missing, unexpected, wrong, table


def _guess_arch(sd: Mapping[str, np.ndarray]) -> str | None:
    for arch in ARCHS:
        missing, unexpected, wrong, _ = _problems(sd, arch)
        if not (missing or unexpected or wrong):
            return arch
    return None


def _variant_hint(sd: Mapping[str, np.ndarray]) -> str:
    if "conv1.0.weight" in sd:
        return ("\nThe file has a deep 3x3 stem (conv1.0/conv1.1/...): a timm 'c/d/s'-variant ResNet such as "
                "resnet50d, which jaxtl does not implement; use a plain ResNet checkpoint.")
    if any(k.endswith("downsample.2.weight") for k in sd):
        return ("\nThe file has average-pool downsampling (downsample.1/.2): a timm 'd'-variant ResNet, which "
                "jaxtl does not implement; use a plain ResNet checkpoint.")
    return ""


def state_dict_to_variables(
    sd: Mapping[str, np.ndarray], arch: str, *, source: str = "<state dict>", fmt: str = "torchvision",
    strict: bool = True,
) -> Variables:
    """Map a torchvision-named state dict onto ``{"params", "batch_stats"}`` (float32 NumPy leaves).

    The ``fc`` layer, when present, becomes ``params/head/fc`` (a ``linear`` head with
    ``fc.weight.shape[0]`` classes); without it the result has the body only. ``strict`` raises
    :class:`ConversionError` listing every missing, unexpected and wrongly-shaped key; with
    ``strict=False`` those keys are skipped and the matching ones returned.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not known; choose one of {sorted(ARCHS)}")
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected, wrong, table = _problems(sd, arch)
    if strict and (missing or unexpected or wrong):
        guess = _guess_arch(sd)
        if guess is not None and guess != arch:
            hint = f"The file's keys and shapes match {guess}: set --arch {guess} (model.arch={guess})."
        else:
            hint = ("Use the arch the file was trained with, or strict=False (--no-strict) to load only the "
                    "matching keys.")
        lines = [f"{source} ({fmt} format) does not match arch={arch!r}. {hint}"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): "
                         + ", ".join(f"{k} {_fmt_shape(table[k][1])}" for k in missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): "
                         + ", ".join(f"{k} {_fmt_shape(tuple(np.shape(sd[k])))}" for k in unexpected))
        if wrong:
            lines.append(f"  wrongly-shaped keys ({len(wrong)}): " + ", ".join(
                f"{k} file {_fmt_shape(tuple(np.shape(sd[k])))} vs {arch} {_fmt_shape(table[k][1])}" for k in wrong))
        raise ConversionError("\n".join(lines) + _variant_hint(sd))
    skip = set(missing) | set(wrong)
    out: Variables = {}
    for name, (path, _, kind) in table.items():
        if name in skip:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _to_jaxtl(sd[name], kind)
    out.setdefault("params", {})
    out.setdefault("batch_stats", {})
    return out


def variables_to_state_dict(variables: Mapping[str, Any], arch: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_dict_to_variables` for a body (+ optional linear head) tree."""
    head = variables.get("params", {}).get("head", {})
    n = int(np.shape(head["fc"]["bias"])[0]) if "fc" in head else 1
    sd: dict[str, np.ndarray] = {}
    for name, (path, _, kind) in name_table(arch, n).items():
        node: Any = variables
        try:
            for key in path:
                node = node[key]
        except KeyError:
            continue
        sd[name] = _to_torch(node, kind)
    return sd


def load_torchvision(path: str, arch: str, *, strict: bool = True) -> Variables:
    """Convert a torchvision-format ``.pth`` state dict (read without torch, no code execution).

    Returns ``{"params": {"body": ..., ["head": {"fc": ...}]}, "batch_stats": {"body": ...}}``.
    """
    from jaxtl.convert.torch_pickle import load_torch_state_dict

    return state_dict_to_variables(load_torch_state_dict(path), arch, source=str(path), fmt="torchvision",
                                   strict=strict)


def load_timm(path: str, arch: str, *, strict: bool = True) -> Variables:
    """Convert a timm ResNet ``.safetensors`` file (e.g. ``timm/resnet50.a1_in1k``'s ``model.safetensors``)."""
    from jaxtl.convert.io import read_safetensors

    tensors, meta = read_safetensors(path)
    if meta.get("format") == "jaxtl":
        raise ConversionError(f"{path} is already a jaxtl weights file: read it with jaxtl.convert.load_variables")
    return state_dict_to_variables(tensors, arch, source=str(path), fmt="timm", strict=strict)
