"""``show_batch``: a PNG grid of augmented training images with their class names (look before training)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from jaxtl.data.pipeline import DataBundle


def show_batch(bundle: DataBundle, path: str | os.PathLike, n: int = 16, epoch: int = 0, valid: bool = False
               ) -> Path:
    """Write the first ``n`` images of epoch ``epoch``'s training batches (or of the validation batches) as a
    PNG grid titled with class names; returns the path. Training images are shown as the model sees them: the
    batch transforms applied (``jaxtl.device_augment.BatchTransform``, here on JAX's default device)."""
    import matplotlib

    from jaxtl.device_augment import BatchTransform

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    images, labels = [], []
    batches = bundle.valid_batches() if valid else bundle.train_batches(epoch)
    transform = BatchTransform.for_data(bundle)
    for batch in batches:
        keep = batch["mask"] if "mask" in batch else np.ones(len(batch["label"]), bool)
        x = batch["image"] if valid else np.asarray(transform.train(batch))
        images.extend(x[keep])
        labels.extend(batch["label"][keep])
        if len(images) >= n:
            break
    images, labels = images[:n], labels[:n]
    if not images:
        raise ValueError("no images to show (empty " + ("validation" if valid else "training") + " set)")
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, y in zip(axes.flat, bundle.denormalize(np.stack(images)), labels, strict=False):
        ax.imshow(img)
        ax.set_title(bundle.classes[int(y)], fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
