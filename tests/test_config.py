import importlib.util
from pathlib import Path

import pytest

from jaxtl.config import base_config, check_override_names, field_paths, validate

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, *args):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(*args)


@pytest.mark.parametrize("name", ["pets", "hymenoptera", "demo"])
def test_shipped_configs_are_valid_and_use_only_declared_fields(name):
    cfg = load_config(name)
    validate(cfg)
    assert set(field_paths(cfg)) == set(field_paths(base_config()))


def test_issue_contract_fields_exist():
    fields = set(field_paths(base_config()))
    for f in ["data.source", "data.path", "data.label", "data.valid_pct", "data.seed", "data.size", "data.min_scale",
              "data.augment", "model.arch", "model.pretrained", "model.head", "train.recipe", "train.epochs",
              "train.freeze_epochs", "train.lr", "train.batch_size", "train.train_bn", "train.precision",
              "train.parallel", "optim.name", "optim.wd", "seed"]:
        assert f in fields, f


def test_a_config_file_adding_a_field_nothing_reads_is_rejected():
    cfg = load_config("demo")
    cfg.train.step_cache = False  # removed field (the step cache went): a config file may still set it
    cfg.optim.weight_decay = 0.1  # misspelling of optim.wd
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert "train.step_cache" in str(e.value) and "optim.weight_decay" in str(e.value)
    assert "did you mean" in str(e.value)


def test_misspelled_override_is_rejected_with_closest_names():
    check_override_names(["--config.optim.name=lamb", "--config.train.lr=1e-3", "--workdir=x"])
    with pytest.raises(ValueError, match=r"--config\.optim\.nmae \(did you mean optim\.name"):
        check_override_names(["--config.optim.nmae=lamb"])
    with pytest.raises(ValueError, match="train.batch_size"):
        check_override_names(["--config.train.batchsize=3"])


@pytest.mark.parametrize("field,value,msg", [
    ("train.recipe", "finetune", "did you mean 'fine_tune'"),
    ("optim.name", "adagrad", "choose one of"),
    ("data.source", "folders", "did you mean 'folder'"),
    ("data.label", "by_parent", "regex:<pattern>"),
    ("train.sync_every", -1, ">= 0"),
    ("data.augment_device", "gpu", "choose one of"),
])
def test_bad_values_name_the_field(field, value, msg):
    cfg = base_config()
    cfg.data.path = "/tmp"
    section, key = field.split(".")
    cfg[section][key] = value
    with pytest.raises(ValueError, match=msg) as e:
        validate(cfg)
    assert field in str(e.value)


def test_metric_must_be_one_the_run_computes():
    from jaxtl.metrics import LOWER_IS_BETTER

    c = load_config("demo")
    c.train.metric = "f1_score"
    with pytest.raises(ValueError, match="train.metric='f1_score'.*'error_rate'.*'top_5_accuracy'"):
        validate(c)
    for m in LOWER_IS_BETTER:
        c.train.metric = m
        validate(c)


def test_label_values_include_tfds_features():
    c = load_config("demo")
    for label in ("parent", "is_cat", r"regex:^(.+)_\d+\.jpg$", "feature:species"):
        c.data.label = label
        validate(c)
    c.data.label = "species"
    with pytest.raises(ValueError, match="data.label='species'.*feature:<name>"):
        validate(c)


def test_ignored_fields_name_the_field_and_the_sources_that_read_it():
    from jaxtl.config import ignored_fields

    c = load_config("pets")
    assert ignored_fields(c.data) == []
    c.data.path, c.data.demo_images = "/some/folder", 5
    msgs = ignored_fields(c.data)
    assert len(msgs) == 2 and "data.path='/some/folder' is ignored: data.source='tfds'" in msgs[0]
    assert "folder, name_func" in msgs[0] and "data.demo_images" in msgs[1]
    assert ignored_fields(load_config("demo").data) == [] and ignored_fields(load_config("hymenoptera").data) == []


@pytest.fixture(scope="module")
def demo_learner_config(tmp_path_factory):
    c = load_config("demo")
    c.data.demo_images, c.data.size, c.model.pretrained, c.train.batch_size = 8, 32, "", 4
    c.train.compile_cache_dir = str(tmp_path_factory.mktemp("xla"))
    return c


@pytest.mark.tensorflow  # builds the demo data
def test_top5_metric_with_five_classes_or_fewer_is_an_error(demo_learner_config, monkeypatch, tmp_path):
    from jaxtl.learner import Learner

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path))
    c = demo_learner_config.copy_and_resolve_references()
    c.train.metric = "top_5_accuracy"
    with pytest.raises(ValueError, match="train.metric='top_5_accuracy'.*more than 5 classes.*has 2"):
        Learner.from_config(c)


@pytest.mark.tensorflow  # builds the demo data
def test_fine_tune_recipe_passes_moms_and_div_final_on(demo_learner_config, monkeypatch, tmp_path):
    """fastai's fine_tune hands its **kwargs (moms, div_final) to both fit_one_cycle calls."""
    from jaxtl.learner import Learner, run_recipe

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path))
    c = demo_learner_config.copy_and_resolve_references()
    c.train.moms, c.train.div_final = (0.9, 0.8, 0.9), 1e3
    learn = Learner.from_config(c)
    calls = []
    monkeypatch.setattr(learn, "_fit_phase", lambda *a: calls.append(a) or [])
    run_recipe(learn, c)
    assert [(a[3], a[5]) for a in calls] == [(1e3, (0.9, 0.8, 0.9))] * 2
