"""Training output: per-epoch progress bar (images/s, ETA), fastai's epoch table, history CSV, TensorBoard
events and PNG plots (loss curve, lr_find). Host-side only; only process 0 writes."""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

BASE_COLUMNS = ("epoch", "train_loss", "valid_loss", "error_rate", "accuracy")


def columns_for(num_classes: int, sized: bool = False) -> list[str]:
    """Table/CSV columns: fastai's, plus ``top_5_accuracy`` when there are more than 5 classes, then time;
    ``sized`` (a ``data.size_schedule``): the epoch's image size after the epoch."""
    cols = list(BASE_COLUMNS[:1]) + (["size"] if sized else []) + list(BASE_COLUMNS[1:])
    if num_classes > 5:
        cols.append("top_5_accuracy")
    return cols + ["time"]


def format_time(seconds: float) -> str:
    """fastai's ``format_time``: ``mm:ss``, or ``h:mm:ss`` past an hour."""
    t = int(seconds)
    h, m, s = t // 3600, (t // 60) % 60, t % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_value(key: str, v: Any) -> str:
    if key == "time":
        return v if isinstance(v, str) else format_time(float(v))
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


class EpochTable:
    """fastai's console table: names padded to 8 characters, joined by two spaces; one row per epoch."""

    def __init__(self, columns: Sequence[str], stream: TextIO | None = None, enabled: bool = True) -> None:
        self.names = [c if len(c) >= 8 else c + " " * (8 - len(c)) for c in columns]
        self.columns = list(columns)
        self.stream = stream
        self.enabled = enabled
        self._header_done = False

    def header(self) -> str:
        return "  ".join(self.names)

    def format_row(self, row: Mapping[str, Any]) -> str:
        text = ""
        for col, name in zip(self.columns, self.names, strict=True):
            t = format_value(col, row.get(col, ""))
            text += t + " " * (2 + len(name) - len(t))
        return text.rstrip()

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        out = self.stream or sys.stdout
        if not self._header_done:
            print(self.header().rstrip(), file=out, flush=True)
            self._header_done = True
        print(self.format_row(row), file=out, flush=True)


def table_string(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The whole history as one fastai-style table."""
    t = EpochTable(columns)
    return "\n".join([t.header().rstrip()] + [t.format_row(r) for r in rows])


class ProgressBar:
    """tqdm bar over one epoch counted in images, so tqdm's rate is images/s and its ETA is the epoch's."""

    def __init__(self, steps: int, batch_size: int, desc: str, enabled: bool = True, initial_step: int = 0) -> None:
        self.batch_size = batch_size
        self.bar = tqdm(total=steps * batch_size, initial=initial_step * batch_size, desc=desc, unit="img",
                        unit_scale=True, leave=False, file=sys.stderr, mininterval=0.5, disable=not enabled,
                        dynamic_ncols=True)

    def update(self, loss: float | None = None, lr: float | None = None) -> None:
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if lr is not None:
            post["lr"] = f"{lr:.2e}"
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(self.batch_size)

    def close(self) -> None:
        self.bar.close()


class HistoryLogger:
    """history.csv (rewritten whole at each epoch, so a resumed run's file equals an uninterrupted one's) and
    TensorBoard scalars in ``workdir/tb``."""

    def __init__(self, workdir: str | Path, enabled: bool = True) -> None:
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def csv_path(self) -> Path:
        return self.workdir / "history.csv"

    def _writer(self) -> Any:
        if self._tb is None:
            self._tb = _summary_writer_class()(logdir=str(self.workdir / "tb"))
        return self._tb

    def write_csv(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
        """One row per epoch with exactly the table's columns (the documented CSV contract); the phase of each
        row lives in the checkpoint metadata and TensorBoard (``epoch/phase``)."""
        if not self.enabled:
            return
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(columns))
            for r in rows:
                w.writerow([format_value(c, r.get(c, "")) for c in columns])
        tmp.replace(self.csv_path)

    def log_epoch(self, row: Mapping[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        w = self._writer()
        for k, v in row.items():
            if k in ("epoch", "time"):
                continue
            if isinstance(v, int | float) and math.isfinite(float(v)):
                w.add_scalar(f"epoch/{k}", float(v), global_step)
        w.flush()

    def log_step(self, global_step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        w = self._writer()
        w.add_scalar("train/loss", loss, global_step)
        w.add_scalar("train/lr", lr, global_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, imported without PyTorch.

    ``tensorboardX.writer`` runs ``try: import torch`` at import time (only to accept torch tensors, which jaxtl
    never logs); with torch installed, as it is for the parity tests, that adds 1-3 s after the first step. Unless
    torch is already loaded, hide it for the import (a ``None`` entry in ``sys.modules`` makes ``import torch`` raise
    ImportError, which tensorboardX catches) and remove the entry again so later imports of torch still work.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", "") is None:
            del sys.modules["torch"]
    return SummaryWriter


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lr_find(path: str | Path, lrs: Sequence[float], losses: Sequence[float],
                 suggestion: tuple[float, float] | None = None, skip_end: int = 5) -> Path:
    """fastai's ``plot_lr_find``: smoothed loss against a log-scaled lr, last ``skip_end`` points dropped,
    the ``valley`` suggestion marked."""
    plt = _pyplot()
    n = len(lrs) - skip_end if len(lrs) > skip_end else len(lrs)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(lrs)[:n], list(losses)[:n])
    if suggestion is not None:
        ax.plot([suggestion[0]], [suggestion[1]], "o", color="red", label=f"valley: {suggestion[0]:.2e}")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("Learning Rate")
    ax.set_ylabel("Loss")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_pandas(history: list[dict[str, Any]]) -> Any:
    """``Learner.to_pandas``: the history rows as a pandas DataFrame (pandas is optional)."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError("Learner.to_pandas needs pandas (pip install pandas); history_table() and "
                          "Learner.history work without it") from e
    return pd.DataFrame(history)
