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
])
def test_bad_values_name_the_field(field, value, msg):
    cfg = base_config()
    cfg.data.path = "/tmp"
    section, key = field.split(".")
    cfg[section][key] = value
    with pytest.raises(ValueError, match=msg) as e:
        validate(cfg)
    assert field in str(e.value)
