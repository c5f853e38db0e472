"""A finished run's outputs in its work dir: loss curves, confusion matrix and top losses (PNG), and
``model.safetensors`` for ``jaxtl.predict``. ``Learner.write_report`` calls :func:`write_report`.

Every process calls it (the validation predictions and images are gathered with collectives); process 0 writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtl import interpret, parallel
from jaxtl.predict import save_for_inference


def write_report(learn: Any, top_k: int = 9) -> dict[str, Path]:
    """Loss curves, confusion matrix, top losses and the inference model of ``learn`` (a ``Learner``) in its work
    dir. Returns the written paths (empty on processes other than 0)."""
    if learn.workdir is None:
        raise ValueError("write_report needs a work dir")
    out: dict[str, Path] = {}
    probs, labels = learn.get_valid_preds(gather=True)  # every process takes part in the collectives
    interp = worst = images = None
    if len(labels):
        # one process: the real (path, label) items; several: each holds only its share, so global indices
        items = (list(learn.data.valid_items)[: len(labels)] if jax.process_count() == 1
                 else [(f"valid[{j}]", int(y)) for j, y in enumerate(labels)])
        interp = interpret.Interpretation.from_probs(probs, labels, learn.classes, items)
        worst = sorted(int(i) for i in interpret.top_losses(interp.losses, top_k))
        images = gather_valid_images(learn.data, worst)
    if not learn.is_main:
        return out
    workdir = learn.workdir
    if learn.history:
        out["loss_curves"] = interpret.plot_loss_curves(learn.history, workdir / "loss_curves.png", learn.step_losses)
    if interp is not None:
        out["confusion_matrix"] = interp.plot_confusion_matrix(workdir / "confusion_matrix.png")
        by_item = {interp.items[i][0]: learn.data.denormalize(images[i]) for i in worst}
        out["top_losses"] = interp.plot_top_losses(workdir / "top_losses.png", lambda item: by_item[item], k=top_k)
    arch = getattr(learn.model, "arch", learn.config.model.arch)
    head = getattr(learn.model, "head_kind", learn.config.model.head)
    d = learn.data
    out["model"] = save_for_inference(workdir, jax.device_get(learn.eval_variables), arch=arch, head=head,
                                      classes=learn.classes, size=int(d.size), mean=d.mean, std=d.std)
    return out


def gather_valid_images(data: Any, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """Validation images as the pipeline yields them (uint8, or normalised float32 with ``data.augment_device=host``;
    ``data.denormalize`` takes either) by global index (see ``Learner.get_valid_preds(gather=True)``); with several
    processes each contributes the ones it holds (a collective)."""
    n, me = jax.process_count(), jax.process_index()
    if n == 1 or not indices:
        return dict(_valid_images(data, set(indices)))
    local = dict(_valid_images(data, {j // n for j in indices if j % n == me}))
    s = int(data.size)
    dtype = np.uint8 if getattr(data, "on_device", False) else np.float32  # the same on every process
    mine = np.stack([local[j // n] if j % n == me else np.zeros((s, s, 3), dtype) for j in indices])
    every = parallel.allgather(mine.astype(dtype))  # (processes, k, S, S, 3)
    return {j: every[j % n, k] for k, j in enumerate(indices)}


def _valid_images(data: Any, indices: set[int]) -> Iterator[tuple[int, np.ndarray]]:
    pos = 0
    for b in data.valid_batches():
        for img, keep in zip(b["image"], b["mask"], strict=True):
            if keep:
                if pos in indices:
                    yield pos, img
                pos += 1
