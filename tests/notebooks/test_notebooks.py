"""The ablation notebooks: each executes end to end with nbclient in SMALL mode (generated demo data, 32 px,
ResNet-18, one seed) and writes its results table (Markdown + CSV, one row per variant, finite metrics) and plot.
Also: the committed notebooks are the ones ``notebooks/make_notebooks.py`` builds from ``notebooks/src``, with no
outputs, and the shared helpers in ``jaxtl.ablation`` aggregate and plot correctly."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jaxtl import ablation  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
KERNEL = "python3"

# notebook -> variants its results table must list, in order
EXPECTED = {
    "00_formulas": None,  # one row per check, all passing
    "01_optimizers": ["adamw", "lamb", "lamb_fastai", "sgd", "sgd, lr x10"],
    "02_recipes": ["fine_tune", "one_cycle, unfrozen", "from scratch"],
    "03_freezing": ["freeze 0", "freeze 1, train_bn on", "freeze 1, train_bn off", "freeze 2, train_bn on",
                    "freeze 2, train_bn off"],
    "04_parallel_precision": ["jit, float32", "jit, bfloat16", "pmap, float32", "pmap, bfloat16"],
    "05_regularisation": ["baseline", "+label smoothing", "+MixUp", "+CutMix", "+EMA", "+TTA", "linear probe",
                          "progressive resizing"],
}


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == sorted(EXPECTED)
    assert sorted(p.stem for p in (NB_DIR / "src").glob("*.py")) == sorted(EXPECTED)


def test_notebooks_match_sources_and_have_no_outputs():
    r = subprocess.run([sys.executable, str(NB_DIR / "make_notebooks.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    for path in NB_DIR.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == KERNEL
        assert nb.cells[0].cell_type == "markdown" and len(nb.cells[0].source) > 300  # the "what and why" cell
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory):
    """Extra environment for the kernels. The ``python3`` kernelspec is normally found through ipykernel (the spec
    it installs, or jupyter_client's built-in fallback to ipykernel's own); if neither is there, write one that
    runs this interpreter and put it on JUPYTER_PATH for the session."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    old_path = os.environ.get("JUPYTER_PATH")
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        jp = tmp_path_factory.mktemp("jupyter")
        spec = jp / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python"}))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(jp), old_path]))
        KernelSpecManager().get_kernel_spec(KERNEL)
    yield {"SMALL": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if old_path is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old_path


def execute(name: str, out_dir: Path, env_extra: dict[str, str]) -> float:
    """Run the notebook in a fresh kernel (working directory notebooks/); returns seconds; fails on any error."""
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    env = {**os.environ, **env_extra, "JAXTL_NB_OUT": str(out_dir)}
    t0 = time.time()
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                     resources={"metadata": {"path": str(NB_DIR)}})
    client.execute(env=env)  # passed on to the kernel manager's start_kernel
    seconds = time.time() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    return seconds


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_in_small_mode(name, kernel_env, tmp_path):
    out = tmp_path / name
    seconds = execute(name, out, kernel_env)
    print(f"{name}: {seconds:.1f} s")
    for f in ("results.md", "results.csv", "results.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(out / "results.csv")
    if EXPECTED[name] is None:  # the formula checks
        assert len(rows) > 20 and all(r["passed"] == "True" for r in rows)
        assert "| rule |" in (out / "results.md").read_text()
        return
    assert [r["variant"] for r in rows] == EXPECTED[name]
    means = [k for k in rows[0] if k.endswith("_mean")]
    assert "error_rate_mean" in means
    for r in rows:
        assert int(r["n"]) == 1  # SMALL=1 runs one seed
        for k in means:
            assert math.isfinite(float(r[k])), (r["variant"], k, r[k])
        assert 0.0 <= float(r["error_rate_mean"]) <= 1.0
    runs = read_csv(out / "runs.csv")
    assert [r["variant"] for r in runs] == EXPECTED[name] and all(r["stopped_early"] == "False" for r in runs)
    md = (out / "results.md").read_text()
    assert all(f"| {v} |" in md for v in EXPECTED[name])
    if name == "02_recipes":  # model.pretrained="" really starts from another initialisation
        by = {r["variant"]: r for r in runs}
        assert by["from scratch"]["train_loss"] != by["one_cycle, unfrozen"]["train_loss"]
    if name == "05_regularisation":  # TTA's metrics replace the last epoch's; the sizes follow the schedule
        by = {r["variant"]: r for r in runs}
        assert by["+TTA"]["error_rate_no_tta"] != "" and float(by["+TTA"]["wall_s"]) > 0
        hist = read_csv(out / "runs" / ablation._slug("progressive resizing") / "seed0" / "history.csv")
        assert [r["size"] for r in hist] == ["24", "32"]
    for v in EXPECTED[name]:  # each run's history.csv, one row per epoch
        hist = read_csv(out / "runs" / ablation._slug(v) / "seed0" / "history.csv")
        hist = [r for r in hist if not r["epoch"].startswith("tta")]  # train.tta's row under the last epoch
        assert len(hist) == int(next(r for r in runs if r["variant"] == v)["epochs"]) >= 1


# ------------------------------------------------------------------------------------------ helpers (fast)


def test_summarize_mean_std_and_markdown():
    rows = [{"variant": "a", "seed": s, "overrides": "x=1", "error_rate": e, "valid_loss": 1.0}
            for s, e in enumerate([0.1, 0.2, 0.3])] + [{"variant": "b", "seed": 0, "overrides": "",
                                                        "error_rate": 0.5, "valid_loss": 2.0}]
    s = ablation.summarize(rows, ("error_rate", "valid_loss"))
    assert [r["variant"] for r in s] == ["a", "b"] and [r["n"] for r in s] == [3, 1]
    assert s[0]["error_rate_mean"] == pytest.approx(0.2) and s[0]["error_rate_std"] == pytest.approx(0.1)
    assert math.isnan(s[1]["error_rate_std"])  # one seed: no spread
    md = ablation.markdown_table(s, ("error_rate", "valid_loss")).splitlines()
    assert md[0].startswith("| variant | error_rate (mean ± std)") and len(md) == 4
    assert "| a | 0.2000 ± 0.1000 | 1.0000 ± 0.0000 | 3 |" in md[2] and "| b | 0.5000 | 2.0000 | 1 |" in md[3]


def test_overrides_validate_field_names():
    base = ablation.base_config(ablation.Settings("t", True, (0,), Path("."), "", "", 0))
    c = ablation.with_overrides(base, {"optim.name": "sgd", "train.lr": 0.01})
    assert c.optim.name == "sgd" and c.train.lr == 0.01 and base.optim.name == "adam"
    with pytest.raises(ValueError, match="did you mean 'train.lr'"):
        ablation.with_overrides(base, {"train.lrr": 0.1})


def test_steady_images_per_second_skips_each_phases_first_epoch():
    hist = [{"phase": 0, "seconds": 9.0}, {"phase": 1, "seconds": 8.0}, {"phase": 1, "seconds": 2.0},
            {"phase": 1, "seconds": 2.0}]
    assert ablation.steady_images_per_second(hist, 100) == pytest.approx(50.0)
    assert math.isnan(ablation.steady_images_per_second(hist[:2], 100))


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SMALL", "1")
    monkeypatch.setenv("JAXTL_NB_OUT", str(tmp_path / "o"))
    monkeypatch.delenv("JAXTL_NB_SEEDS", raising=False)
    s = ablation.settings("x")
    assert s.small and s.seeds == (0,) and s.out_dir == tmp_path / "o"
    monkeypatch.setenv("SMALL", "0")
    monkeypatch.delenv("JAXTL_NB_OUT")
    monkeypatch.setenv("JAXTL_DATA", str(tmp_path / "missing"))
    s = ablation.settings("x")
    assert not s.small and s.seeds == (0, 1, 2) and s.out_dir == ROOT / "notebooks" / "out" / "x"
    assert s.pretrained == "resnet34.tv_in1k"
    with pytest.raises(FileNotFoundError, match="JAXTL_DATA"):
        ablation.base_config(s)


def test_plot_results_writes_png(tmp_path):
    rows = [{"variant": v, "seed": s, "error_rate": 0.1 * (i + s), "valid_loss": 1.0} for i, v in enumerate("ab")
            for s in range(2)]
    hist = {v: [[{"phase": 0, "epoch": e, "valid_loss": 1.0 / (e + 1)} for e in range(3)]] * 2 for v in "ab"}
    p = ablation.plot_results(ablation.summarize(rows, ("error_rate", "valid_loss")), tmp_path / "r.png",
                              ("error_rate",), hist, title="t")
    assert p.read_bytes()[:4] == b"\x89PNG"
