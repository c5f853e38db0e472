"""Interpretation after a run: confusion matrix, top losses, loss curves — arrays in, PNG files out.

fastai's ``ClassificationInterpretation`` in plain functions. ``confusion_matrix`` rows are the actual
class, columns the predicted one. ``top_losses`` orders validation images by their cross-entropy
loss, largest first. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: ``cm[a, p]`` = images of actual class a predicted as p."""
    labels = np.asarray(labels, np.int64)
    preds = np.asarray(preds, np.int64)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def most_confused(cm: np.ndarray, classes: Sequence[str], min_val: int = 1) -> list[tuple[str, str, int]]:
    """Off-diagonal cells with at least ``min_val`` images, largest first: (actual, predicted, count)."""
    out = [(classes[a], classes[p], int(cm[a, p]))
           for a in range(cm.shape[0]) for p in range(cm.shape[1]) if a != p and cm[a, p] >= min_val]
    return sorted(out, key=lambda t: -t[2])


def top_losses(losses: np.ndarray, k: int | None = None) -> np.ndarray:
    """Indices of the ``k`` largest losses, largest first (stable for ties)."""
    order = np.argsort(-np.asarray(losses), kind="stable")
    return order if k is None else order[:k]


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    plt = _pyplot()
    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title(title)
    if n <= 40:
        thresh = cm.max() / 2 if cm.size else 0
        for a in range(n):
            for p in range(n):
                ax.text(p, a, str(cm[a, p]), ha="center", va="center", fontsize=8,
                        color="white" if cm[a, p] > thresh else "black")
    fig.tight_layout()
    return _save(fig, path)


def plot_top_losses(images: np.ndarray, titles: Sequence[str], path: str | Path) -> Path:
    """Grid of images (N, H, W, 3) in [0, 1], each titled 'pred/actual/loss/prob'."""
    plt = _pyplot()
    n = len(images)
    cols = min(3, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    fig.suptitle("Prediction/Actual/Loss/Probability")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(np.clip(images[i], 0, 1))
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_curves(history: Sequence[Mapping[str, float]], path: str | Path,
                     step_losses: Sequence[float] | None = None) -> Path:
    """Train loss per step (if given, with its epoch-averaged value) and valid loss per epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    if step_losses is not None and len(step_losses):
        steps = np.arange(1, len(step_losses) + 1)
        ax.plot(steps / len(step_losses) * max(len(history), 1), step_losses, alpha=0.35, label="train (per batch)")
    ax.plot([e + 1 for e in epochs], [r["train_loss"] for r in history], "o-", label="train (epoch)")
    ax.plot([e + 1 for e in epochs], [r["valid_loss"] for r in history], "s-", label="valid")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


@dataclass
class Interpretation:
    """Per-image validation results: ``probs`` (N, C), ``labels`` (N,), ``losses`` (N,), ``items`` (path, label)."""

    probs: np.ndarray
    labels: np.ndarray
    losses: np.ndarray
    classes: list[str]
    items: list[tuple[str, int]]

    @classmethod
    def from_probs(cls, probs: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                   items: Sequence[tuple[str, int]]) -> Interpretation:
        probs = np.asarray(probs, np.float64)
        labels = np.asarray(labels, np.int64)
        losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
        return cls(probs, labels, losses, list(classes), list(items))

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(-1)

    def confusion_matrix(self) -> np.ndarray:
        return confusion_matrix(self.labels, self.preds, len(self.classes))

    def most_confused(self, min_val: int = 1) -> list[tuple[str, str, int]]:
        return most_confused(self.confusion_matrix(), self.classes, min_val)

    def top_losses(self, k: int = 9) -> list[dict]:
        """The k worst images as dicts: item, actual, predicted, loss, probability of the prediction."""
        rows = []
        for i in top_losses(self.losses, k):
            p = int(self.preds[i])
            rows.append({"item": self.items[i][0], "actual": self.classes[self.labels[i]],
                         "predicted": self.classes[p], "loss": float(self.losses[i]),
                         "probability": float(self.probs[i, p])})
        return rows

    def plot_confusion_matrix(self, path: str | Path) -> Path:
        return plot_confusion_matrix(self.confusion_matrix(), self.classes, path)

    def plot_top_losses(self, path: str | Path, load_image, k: int = 9) -> Path:
        """``load_image(item) -> (H, W, 3)`` in [0, 1] (e.g. the data bundle's eval transform, denormalised)."""
        rows = self.top_losses(k)
        images = np.stack([load_image(r["item"]) for r in rows]) if rows else np.zeros((0, 1, 1, 3))
        titles = [f"{r['predicted']}/{r['actual']}/{r['loss']:.2f}/{r['probability']:.2f}" for r in rows]
        return plot_top_losses(images, titles, path)
