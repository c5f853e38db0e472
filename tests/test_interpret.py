import numpy as np
from PIL import Image

from jaxtl import interpret


def test_confusion_matrix_counts_against_loop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    preds = rng.integers(0, 4, 200)
    cm = interpret.confusion_matrix(labels, preds, 4)
    ref = np.zeros((4, 4), int)
    for a, p in zip(labels, preds, strict=True):
        ref[a, p] += 1
    np.testing.assert_array_equal(cm, ref)
    assert cm.sum() == 200


def test_interpretation_losses_top_losses_and_plots(tmp_path):
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.01, 0.99]])
    labels = np.array([0, 0, 1, 1])
    items = [(f"img{i}.jpg", int(label)) for i, label in enumerate(labels)]
    it = interpret.Interpretation.from_probs(probs, labels, ["ant", "bee"], items)
    np.testing.assert_allclose(it.losses, -np.log([0.9, 0.2, 0.4, 0.99]), rtol=1e-12)
    worst = it.top_losses(2)
    assert [w["item"] for w in worst] == ["img1.jpg", "img2.jpg"]
    assert worst[0]["predicted"] == "bee" and worst[0]["actual"] == "ant"
    assert it.most_confused() == [("ant", "bee", 1), ("bee", "ant", 1)]
    p1 = it.plot_confusion_matrix(tmp_path / "cm.png")
    p2 = it.plot_top_losses(tmp_path / "top.png", lambda item: np.full((8, 8, 3), 0.5), k=2)
    hist = [{"epoch": 0, "train_loss": 1.0, "valid_loss": 0.9}, {"epoch": 1, "train_loss": 0.5, "valid_loss": 0.6}]
    p3 = interpret.plot_loss_curves(hist, tmp_path / "loss.png", step_losses=[1.2, 1.0, 0.7, 0.5])
    for p in (p1, p2, p3):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
