"""Prediction with a finished run::

    python -m jaxtl.predict --workdir DIR image.jpg [more images or folders] [--json] [--top-k K] [--tta N]
    python -m jaxtl.predict --workdir DIR --export OUT    # portable jax.export artifact (jaxtl/export.py)

Reads ``DIR/model.safetensors`` (jaxtl weights format; its metadata holds the arch, head, class names
and the validation transform: size, mean, std), applies the validation transform (resize + centre crop,
ImageNet normalisation) and prints ``path  label  probability`` per image. The same is available to
notebooks as :func:`load_predictor` / :func:`predict`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.safetensors"


def save_for_inference(workdir: str | os.PathLike, variables: Mapping[str, Any], *, arch: str, head: str,
                       classes: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]) -> Path:
    """Write ``workdir/model.safetensors`` with everything :func:`load_predictor` needs."""
    import jax

    from jaxtl.convert.io import save_variables

    host = jax.tree_util.tree_map(np.asarray, jax.device_get(dict(variables)))
    meta = {"arch": arch, "head": head, "num_classes": len(classes), "classes": json.dumps(list(classes)),
            "size": size, "mean": json.dumps(list(mean)), "std": json.dumps(list(std))}
    return save_variables(Path(workdir) / MODEL_FILE, host, meta)


def predict_in_batches(probs: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    """``probs`` over ``images`` (N, S, S, 3) in batches of ``batch_size``, the last one padded with zeros (one
    compiled shape) and the padding's rows dropped: the one batched prediction that the CLI, ``Learner.predict``
    and interpretation (``Learner.get_valid_preds``, a batch at a time) use."""
    out = []
    for i in range(0, len(images), batch_size):
        chunk = np.asarray(images[i:i + batch_size], np.float32)
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
        out.append(np.asarray(probs(chunk))[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class Predictor:
    """A trained model and its validation transform. ``predict(paths)`` -> one dict per image."""

    model: Any
    variables: dict[str, Any]
    classes: list[str]
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        import jax

        from jaxtl.data.eval_transform import EvalTransform
        from jaxtl.train import make_predict_step

        self._apply = jax.jit(make_predict_step(self.model))
        self.preprocess = EvalTransform(self.size, self.mean, self.std)  # path / bytes / array -> (S, S, 3)

    def probabilities(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N, S, S, 3) preprocessed images -> (N, C) softmax probabilities."""
        probs = predict_in_batches(lambda x: self._apply(self.variables, x), images, batch_size)
        return probs.reshape(len(images), len(self.classes))

    def predict(self, paths: Sequence[str | os.PathLike], batch_size: int = 32, top_k: int = 1, tta: int = 0,
                aug: Any = None) -> list[dict]:
        """One dict per path: ``path, label, probability, top`` ([(label, p)] * top_k) or ``error``. ``tta`` > 0:
        fastai's test-time augmentation with that many passes (``jaxtl.tta.predict_tta``; ``aug``: the run's
        ``AugParams``, see :func:`run_aug`)."""
        results: list[dict] = []
        ok: list[tuple[int, np.ndarray]] = []
        for i, p in enumerate(paths):
            try:
                ok.append((i, self.preprocess(p)))
                results.append({"path": str(p)})
            except (FileNotFoundError, ValueError) as e:
                results.append({"path": str(p), "error": str(e)})
        if not ok:
            return results
        if tta:
            from jaxtl.tta import predict_tta

            probs = predict_tta(self, [paths[i] for i, _ in ok], tta, aug, batch_size=batch_size)
        else:
            probs = self.probabilities(np.stack([x for _, x in ok]), batch_size)
        for (i, _), pr in zip(ok, probs, strict=True):
            order = np.argsort(-pr)[:max(1, top_k)]
            results[i].update(label=self.classes[order[0]], probability=float(pr[order[0]]),
                              top=[(self.classes[j], float(pr[j])) for j in order])
        return results


def load_predictor(workdir: str | os.PathLike) -> Predictor:
    """Load ``workdir/model.safetensors`` written at the end of a run."""
    from jaxtl.convert.io import load_variables
    from jaxtl.models import create_model

    path = Path(workdir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --workdir must be the work dir of a finished jaxtl run "
                                "(it is written when training ends)")
    variables, meta = load_variables(path)
    if "classes" not in meta:
        raise ValueError(f"{path} has no class names in its metadata; it is a converted weights file, not a run's "
                         "model. Point --workdir at a run directory.")
    classes = json.loads(meta["classes"])
    model = create_model(meta["arch"], len(classes), head=meta["head"])
    return Predictor(model, variables, classes, int(meta["size"]), tuple(json.loads(meta["mean"])),
                     tuple(json.loads(meta["std"])))


def run_aug(workdir: str | os.PathLike, size: int) -> Any:
    """The run's augmentation (``AugParams`` from ``workdir/config.json``'s ``data`` section, the defaults when the
    file is missing) at the model's ``size``: what ``--tta`` applies."""
    import ml_collections

    from jaxtl.config import base_config
    from jaxtl.data.augment import AugParams

    data = base_config().data
    path = Path(workdir) / "config.json"
    if path.is_file():
        data.update(ml_collections.ConfigDict(json.loads(path.read_text()).get("data", {})))
    data.size = int(size)
    return AugParams.from_config(data)


def expand_images(items: Sequence[str]) -> list[str]:
    """Files as given; folders expanded to the images inside them (sorted, recursive)."""
    from jaxtl.data import list_images

    out: list[str] = []
    for item in items:
        p = Path(item)
        out.extend(str(x) for x in list_images(p)) if p.is_dir() else out.append(item)
    return out


def predict(workdir: str | os.PathLike, images: Sequence[str | os.PathLike], top_k: int = 1) -> list[dict]:
    """Notebook helper: ``predict("runs/x", ["a.jpg"])`` -> ``[{"path", "label", "probability", "top"}]``."""
    return load_predictor(workdir).predict(expand_images([str(i) for i in images]), top_k=top_k)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxtl.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="work dir of a finished run (holds model.safetensors)")
    ap.add_argument("images", nargs="*", help="image files and/or folders of images")
    ap.add_argument("--export", metavar="DIR", default=None,
                    help="write DIR/model.jax (jax.export, runs with jax + numpy only) and DIR/model.json")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    ap.add_argument("--top-k", type=int, default=1, help="also list the k most probable labels")
    ap.add_argument("--tta", type=int, default=0, metavar="N",
                    help="test-time augmentation: N passes with the run's training transforms (fastai, beta 0.25)")
    args = ap.parse_args(argv)
    try:
        predictor = load_predictor(args.workdir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.export:
        from jaxtl.export import export_model

        p = predictor
        written = export_model(args.export, p.model, p.variables, p.classes, p.size, p.mean, p.std)
        print(f"exported {written['model']} and {written['spec']}")
        if not args.images:
            return 0
    if not args.images:
        print("error: give image files or folders to predict, or --export DIR", file=sys.stderr)
        return 2
    paths = expand_images(args.images)
    if not paths:
        print(f"error: no images found in {args.images}", file=sys.stderr)
        return 2
    aug = run_aug(args.workdir, predictor.size) if args.tta else None
    results = predictor.predict(paths, top_k=args.top_k, tta=args.tta, aug=aug)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(len(r["path"]) for r in results)
        for r in results:
            if "error" in r:
                print(f"{r['path']:<{width}}  ERROR  {r['error']}")
            else:
                extra = "  " + ", ".join(f"{c}={p:.3f}" for c, p in r["top"][1:]) if args.top_k > 1 else ""
                print(f"{r['path']:<{width}}  {r['label']}  {r['probability']:.4f}{extra}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
