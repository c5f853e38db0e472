"""Helpers the ablation notebooks (``notebooks/``) share: settings from the environment, config variants over
seeds, mean ± std tables (Markdown + CSV) and a summary plot.

A *variant* is a name and a dict of config overrides (``{"optim.name": "sgd", "train.lr": 1e-2}``); a run is
``Learner.from_config`` + ``run_recipe`` (the recipe is ``train.recipe``), so such a variant is an ordinary config
that ``python -m jaxtl.main`` runs the same way. ``Variant(overrides, fit)`` replaces ``run_recipe`` by
``fit(learn, config)`` where the recipe is not a config field (e.g. :func:`unfreeze_then_recipe`). Environment:

- ``SMALL=1``: tiny smoke mode (``data.source=demo``, 32 px, ResNet-18 with ``demo:resnet18:1000`` weights, one
  seed);
- ``JAXTL_DATA``: the image folder of the real mode (default ``../shared/data/hymenoptera_data`` from the repo root);
- ``JAXTL_PRETRAINED``: ``model.pretrained`` of the real mode (default ``resnet34.tv_in1k``);
- ``JAXTL_NB_OUT``: output folder (default ``notebooks/out/<notebook name>``);
- ``JAXTL_NB_SEEDS``: number of seeds (default 3, or 1 with ``SMALL=1``);
- ``JAXTL_NB_MAX_STEPS``: ``train.max_steps`` (cap per fit; default 0 = none), for quick looks at the real mode;
- ``JAXTL_NB_ARCH``, ``JAXTL_NB_SIZE``: ``model.arch`` and ``data.size`` of the real mode (default resnet34, 224).

A run's metrics are its last epoch's; with ``train.tta`` > 0 the validation metrics are TTA's (the ``tta(n)`` row
under the last epoch) and the last epoch's error rate is kept as ``error_rate_no_tta``. ``wall_s`` is the run's
whole wall time (data, model, compiles, epochs, validation, TTA).
"""

from __future__ import annotations

import copy
import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxtl import config as jconfig

METRICS = ("error_rate", "valid_loss", "accuracy", "train_loss")
DEFAULT_DATA = "../shared/data/hymenoptera_data"
DEFAULT_PRETRAINED = "resnet34.tv_in1k"


@dataclass(frozen=True)
class Settings:
    name: str
    small: bool
    seeds: tuple[int, ...]
    out_dir: Path
    data_path: str
    pretrained: str
    max_steps: int
    arch: str = "resnet34"
    size: int = 224


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def repo_root(start: Path | None = None) -> Path:
    """The first folder upwards from ``start`` (default: cwd) holding jaxtl's ``pyproject.toml``, else the checkout
    this module was imported from (an editable install), else ``start``."""
    start = (start or Path.cwd()).resolve()
    here = Path(__file__).resolve().parents[1]
    for d in (start, *start.parents, here):
        if (d / "pyproject.toml").is_file() and (d / "jaxtl").is_dir():
            return d
    return start


def settings(name: str) -> Settings:
    """Read the environment (see the module docstring) for the notebook ``name``."""
    small = _flag("SMALL")
    root = repo_root()
    n_seeds = int(os.environ.get("JAXTL_NB_SEEDS", "") or (1 if small else 3))
    if n_seeds < 1:
        raise ValueError(f"JAXTL_NB_SEEDS must be >= 1, got {n_seeds}")
    out = Path(os.environ.get("JAXTL_NB_OUT", "") or root / "notebooks" / "out" / name)
    data = os.environ.get("JAXTL_DATA", "") or str((root / DEFAULT_DATA).resolve())
    return Settings(name=name, small=small, seeds=tuple(range(n_seeds)), out_dir=out, data_path=data,
                    pretrained=os.environ.get("JAXTL_PRETRAINED", "") or DEFAULT_PRETRAINED,
                    max_steps=int(os.environ.get("JAXTL_NB_MAX_STEPS", "") or 0),
                    arch=os.environ.get("JAXTL_NB_ARCH", "") or "resnet34",
                    size=int(os.environ.get("JAXTL_NB_SIZE", "") or 224))


def base_config(s: Settings) -> ml_collections.ConfigDict:
    """The config every variant starts from: fastai's ``fine_tune`` defaults on the small or the real data."""
    c = jconfig.base_config()
    if s.small:
        c.data.source = "demo"  # 2 classes x 16 generated JPEGs: 24 train (3 batches of 8), 8 valid
        c.data.demo_classes = 2
        c.data.demo_images = 16
        c.data.valid_pct = 0.25
        c.data.size = 32
        c.model.arch = "resnet18"
        # seeded weights written in torchvision's format and loaded through the conversion path; seed 1000, which
        # no run uses, so that they differ from a from-scratch run's initialisation (demo:<arch> = seed 0)
        c.model.pretrained = "demo:resnet18:1000"
        c.train.batch_size = 8
    else:
        if not Path(s.data_path).is_dir():
            raise FileNotFoundError(f"no image folder at {s.data_path}: set JAXTL_DATA to a folder with train/ and "
                                    "val/ (or class) sub-folders, or run with SMALL=1 for the generated demo data")
        c.data.source = "folder"
        c.data.path = s.data_path
        c.data.size = s.size
        c.model.arch = s.arch
        c.model.pretrained = s.pretrained
        c.train.batch_size = 32
    c.train.recipe = "fine_tune"
    c.train.checkpoint = False  # ablations need the history, not the weights
    c.train.max_steps = s.max_steps
    return c


@dataclass(frozen=True)
class Variant:
    """Config overrides, and optionally a ``fit(learn, config)`` that runs instead of ``run_recipe``."""

    overrides: Mapping[str, Any] = field(default_factory=dict)
    fit: Callable[[Any, ml_collections.ConfigDict], Any] | None = None


def unfreeze_then_recipe(learn: Any, config: ml_collections.ConfigDict) -> None:
    """``learn.unfreeze()``, then ``train.recipe`` (e.g. ``one_cycle`` over every layer of a pretrained model;
    ``Learner.from_config`` starts a pretrained model frozen, as fastai's ``vision_learner``)."""
    from jaxtl.learner import run_recipe

    learn.unfreeze()
    run_recipe(learn, config)


def run_note(s: Settings, config: ml_collections.ConfigDict) -> str:
    """One line saying what the numbers come from: mode, data, model, seeds, devices."""
    import jax

    d, m = config.data, config.model
    data = f"demo ({d.demo_classes} classes x {d.demo_images} images)" if d.source == "demo" else d.path
    devs = jax.devices()
    return (f"{'SMALL smoke-test mode (numbers mean nothing)' if s.small else 'real mode'}; data {data} at "
            f"{d.size} px; {m.arch}, pretrained={m.pretrained or 'none'!r}; batch {config.train.batch_size}; "
            f"seeds {list(s.seeds)}; {len(devs)} x {devs[0].device_kind}"
            + (f"; train.max_steps={config.train.max_steps}" if config.train.max_steps else ""))


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted fields set (``{"optim.name": "sgd"}``); unknown fields raise ValueError."""
    c = copy.deepcopy(config)
    valid = jconfig.field_paths(c)
    for key, value in overrides.items():
        if key not in valid:
            hint = jconfig.closest(key, valid)
            raise ValueError(f"unknown config field {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def describe(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "(base config)"


def steady_images_per_second(history: Sequence[Mapping[str, Any]], images_per_epoch: int) -> float:
    """Training images/s over the epochs that are not the first of their phase (the first one compiles).
    NaN when every epoch is the first of its phase."""
    seen: set[Any] = set()
    seconds = 0.0
    n = 0
    for row in history:
        if row.get("phase") in seen:
            seconds += float(row["seconds"])
            n += 1
        seen.add(row.get("phase"))
    return n * images_per_epoch / seconds if n and seconds > 0 else float("nan")


def run_one(config: ml_collections.ConfigDict, workdir: str | Path | None = None,
            fit: Callable[[Any, ml_collections.ConfigDict], Any] | None = None) -> tuple[dict[str, Any], list]:
    """Build a Learner from ``config``, run ``fit(learn, config)`` (default: ``run_recipe``, i.e.
    ``train.recipe``); returns (final metrics, history rows)."""
    import time

    from jaxtl.learner import Learner, run_recipe

    t0 = time.perf_counter()
    learn = Learner.from_config(config, workdir)
    try:
        result = (fit or run_recipe)(learn, config)
        hist = [dict(r) for r in learn.history]
        last = hist[-1] if hist else {}
        out: dict[str, Any] = {m: float(last.get(m, float("nan"))) for m in METRICS}
        if isinstance(result, Mapping) and "tta_error_rate" in result:  # train.tta: the metrics with TTA
            out["error_rate_no_tta"] = out["error_rate"]
            out.update({m: float(result[f"tta_{m}"]) for m in ("error_rate", "valid_loss", "accuracy")})
        out["wall_s"] = time.perf_counter() - t0
        out["epochs"] = len(hist)
        out["train_s"] = float(sum(float(r.get("seconds", 0.0)) for r in hist))
        # max_steps may cut epochs short; then a full epoch's image count would overstate the speed
        full = not int(config.train.max_steps)
        out["img_s"] = (steady_images_per_second(hist, learn.data.steps_per_epoch * learn.global_batch)
                        if full else float("nan"))
        out["stopped_early"] = bool(learn.stopped_early)
        return out, hist
    finally:
        learn.close()


def run_variants(base: ml_collections.ConfigDict, variants: Mapping[str, Variant | Mapping[str, Any]],
                 seeds: Sequence[int], runs_dir: str | Path | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, list[list]]]:
    """Every variant (a ``Variant`` or a dict of overrides) for every seed. Returns (one row per run: variant,
    seed, overrides, metrics) and ``{variant: [history of each seed]}``. With ``runs_dir`` each run writes its
    ``history.csv`` (and TensorBoard events) into ``runs_dir/<variant>/seed<k>``."""
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[list]] = {}
    for name, spec in variants.items():
        v = spec if isinstance(spec, Variant) else Variant(dict(spec))
        overrides = dict(v.overrides)
        if v.fit is not None:
            overrides["fit"] = getattr(v.fit, "__name__", "custom")
        for seed in seeds:
            cfg = with_overrides(base, {**v.overrides, "seed": int(seed)})
            print(f"== {name}  seed {seed}  ({describe(overrides)})", flush=True)
            workdir = Path(runs_dir) / _slug(name) / f"seed{seed}" if runs_dir is not None else None
            metrics, hist = run_one(cfg, workdir, v.fit)
            rows.append({"variant": name, "seed": int(seed), "overrides": describe(overrides), **metrics})
            histories.setdefault(name, []).append(hist)
    return rows, histories


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """One row per variant (first-seen order): ``n``, ``<m>_mean`` and ``<m>_std`` (sample std over seeds; NaN
    with one seed)."""
    out: list[dict[str, Any]] = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        row: dict[str, Any] = {"variant": name, "overrides": mine[0].get("overrides", ""), "n": len(mine)}
        for m in metrics:
            vals = np.array([float(r[m]) for r in mine], np.float64)
            row[f"{m}_mean"] = float(vals.mean())
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        out.append(row)
    return out


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def markdown_table(summary: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    """``| variant | <m> (mean ± std) ... | seeds | overrides |``."""
    head = ["variant"] + [f"{m} (mean ± std)" for m in metrics] + ["seeds", "config overrides"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [str(r["variant"])]
        for m in metrics:
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            cells.append(_fmt(mean) + ("" if not math.isfinite(std) else f" ± {_fmt(std)}"))
        cells += [str(r["n"]), f"`{r['overrides']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def write_results(summary: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], out_dir: str | Path,
                  metrics: Sequence[str] = METRICS, title: str = "", note: str = "") -> dict[str, Path]:
    """``results.md`` (mean ± std table), ``results.csv`` (the same numbers) and ``runs.csv`` (every run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    text = (f"# {title}\n\n" if title else "") + (f"{note}\n\n" if note else "") + markdown_table(summary, metrics)
    md.write_text(text + "\n")
    return {"markdown": md, "csv": write_csv(summary, out_dir / "results.csv"),
            "runs": write_csv(rows, out_dir / "runs.csv")}


def mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]], key: str) -> np.ndarray:
    """Per-epoch mean of ``key`` over seeds (truncated to the shortest history)."""
    n = min((len(h) for h in histories), default=0)
    if n == 0:
        return np.zeros((0,))
    return np.array([[float(h[i][key]) for i in range(n)] for h in histories]).mean(0)


def plot_results(summary: Sequence[Mapping[str, Any]], path: str | Path, metrics: Sequence[str] = ("error_rate",),
                 histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]] | None = None,
                 curve: str = "valid_loss", title: str = "") -> Path:
    """One bar panel per metric (mean, error bar = std over seeds) and, with ``histories``, the per-epoch mean
    ``curve`` of each variant. Written with matplotlib's object API (no pyplot state, any backend)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = [str(r["variant"]) for r in summary]
    n_panels = len(metrics) + (1 if histories else 0)
    fig = Figure(figsize=(4.2 * n_panels, 3.6 + 0.08 * max(len(n) for n in names)), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    x = np.arange(len(names))
    colors = [f"C{i % 10}" for i in range(len(names))]
    for ax, m in zip(axes, metrics, strict=False):
        means = np.array([r[f"{m}_mean"] for r in summary], np.float64)
        stds = np.array([r[f"{m}_std"] for r in summary], np.float64)
        spread = np.where(np.isfinite(stds), stds, 0.0) if np.isfinite(stds).any() else None  # none: 1 seed
        ax.bar(x, means, yerr=spread, color=colors, capsize=4)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title(m)
        ax.grid(axis="y", alpha=0.3)
    if histories:
        ax = axes[-1]
        for name, color in zip(names, colors, strict=True):
            y = mean_curve(histories.get(name, []), curve)
            if len(y):
                ax.plot(np.arange(len(y)), y, "o-", color=color, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(f"{curve} (mean over seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
