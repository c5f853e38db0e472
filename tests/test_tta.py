"""Test-time augmentation (fastai ``Learner.tta``): the passes are the validation images with the training
transforms, deterministic per pass; the result is ``(1 - beta) * mean(passes) + beta * plain``, checked against
an independent computation of each pass (the batch transform and the model applied directly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxtl.config import base_config
from jaxtl.data import build_data
from jaxtl.device_augment import BatchTransform
from jaxtl.learner import Learner, run_recipe
from jaxtl.models import create_model

pytestmark = pytest.mark.tensorflow


def folder(root, per_class=7):
    """Smooth random photos (so crops differ) in two classes; valid_pct splits them."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            low = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
            Image.fromarray(low).resize((64 + 4 * i, 48), Image.BICUBIC).save(root / c / f"{c}{i}.png")
    return root


def data_cfg(path, **kw):
    d = base_config().data
    d.path, d.size, d.valid_pct = str(path), 32, 0.4
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def test_tta_passes_cover_the_validation_set_with_train_transforms(tmp_path):
    b = build_data(data_cfg(folder(tmp_path / "f")), 4, 0)
    valid = list(b.valid_batches())
    p0, p0_again, p1 = list(b.tta_batches(0)), list(b.tta_batches(0)), list(b.tta_batches(1))
    assert len(p0) == len(valid) == b.valid_steps
    for v, x, y in zip(valid, p0, p0_again, strict=True):
        assert np.array_equal(v["label"], x["label"]) and np.array_equal(v["mask"], x["mask"])
        assert set(x) == {"image", "label", "mask", "affine", "flip", "lighting"}
        assert all(np.array_equal(x[k], y[k]) for k in x)  # the same augmentation on every call
    assert not np.array_equal(p0[0]["image"], p1[0]["image"])  # passes differ
    assert not np.array_equal(p0[0]["image"], valid[0]["image"])  # RandomResizedCrop, not the centre crop


def test_learner_tta_is_fastais_blend_of_the_passes(tmp_path):
    data = build_data(data_cfg(folder(tmp_path / "f")), 4, 0)
    model = create_model("resnet18", len(data.classes))
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))
    c = base_config()
    c.model.arch, c.train.batch_size = "resnet18", 4
    learn = Learner(model, v, data, c)
    plain, labels = learn.get_valid_preds()
    (aug, plain2), labels2 = learn.tta(n=3, beta=None)
    assert np.array_equal(plain, plain2) and np.array_equal(labels, labels2)
    # each pass by hand: the batch transform with the batch's draws, then the model (eval mode), softmax
    t, passes = BatchTransform.for_data(data), []
    apply = jax.jit(lambda b: jax.nn.softmax(model.apply(v, t.train(b), False), -1))
    for i in range(3):
        rows = [np.asarray(apply({k: jnp.asarray(x) for k, x in b.items() if k != "mask"}))[b["mask"]]
                for b in data.tta_batches(i)]
        passes.append(np.concatenate(rows))
    np.testing.assert_allclose(aug, np.mean(passes, 0), rtol=1e-5, atol=1e-6)
    assert np.abs(aug - plain).max() > 1e-4  # augmentation changes the predictions
    blended, _ = learn.tta(n=3, beta=0.25)
    np.testing.assert_allclose(blended, 0.75 * np.mean(passes, 0) + 0.25 * plain, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="n >= 1"):
        learn.tta(n=0)
    with pytest.raises(ValueError, match=r"beta .* \[0, 1\]"):
        learn.tta(beta=1.5)


def test_train_tta_adds_a_row_to_the_table_and_history_csv(tmp_path, capsys):
    data = build_data(data_cfg(folder(tmp_path / "f")), 4, 0)
    model = create_model("resnet18", len(data.classes))
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))
    c = base_config()
    c.model.arch, c.train.batch_size, c.train.recipe, c.train.tta = "resnet18", 4, "one_cycle", 2
    learn = Learner(model, v, data, c, tmp_path / "run")
    summary = run_recipe(learn, c)
    probs, labels = learn.tta(2)  # the same passes again: the same numbers
    assert summary["tta_error_rate"] == pytest.approx(float((probs.argmax(1) != labels).mean()))
    assert summary["tta_valid_loss"] == pytest.approx(float(-np.log(probs[np.arange(len(labels)), labels]).mean()),
                                                      rel=1e-5)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("tta(2)") for line in lines)
    csv_rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert csv_rows[-1].startswith("tta(2),,") and len(learn.history) == 1  # the history keeps epochs only
    learn.close()


def test_predict_cli_tta_blends_augmented_passes_with_the_plain_prediction(tmp_path, capsys):
    import json

    from jaxtl import predict
    from jaxtl.tta import predict_tta

    model = create_model("resnet18", 2)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(1))
    run = tmp_path / "run"
    predict.save_for_inference(run, v, arch="resnet18", head="fastai", classes=["a", "b"], size=32,
                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    images = [str(p) for p in sorted(folder(tmp_path / "f", per_class=3).rglob("*.png"))]
    p = predict.load_predictor(run)
    aug_params = predict.run_aug(run, p.size)
    aug, plain = predict_tta(p, images, 2, aug_params, beta=None)  # batch 32, as the CLI
    np.testing.assert_allclose(plain, p.probabilities(np.stack([p.preprocess(x) for x in images])), rtol=1e-6)
    assert np.abs(aug - plain).max() > 1e-4  # the passes are augmented
    assert predict.main(["--workdir", str(run), "--tta", "2", "--json", *images]) == 0
    got = json.loads(capsys.readouterr().out)
    want = 0.75 * aug + 0.25 * plain  # fastai: torch.lerp(aug, plain, beta=0.25)
    for r, w in zip(got, want, strict=True):
        assert r["label"] == ["a", "b"][int(w.argmax())]
        assert r["probability"] == pytest.approx(float(w.max()), rel=1e-5)
