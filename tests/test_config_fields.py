"""Every ``train.*``, ``optim.*`` and ``model.*`` field has an effect or a clear message (issue: plain core, point 6).

For each recipe, each field is set to another valid value. When the recipe (and the optimiser, and the model
settings) read the field, what the run would do must change; otherwise validation must warn naming the field.

"What the run would do" is recorded at the run's boundaries through ``Learner.from_config`` and the real recipe
code, with the expensive parts replaced (no XLA compile of a train or eval step): the data the run asks for
(``build_data``'s arguments), the weights it loads, the model (its repr: architecture, head, dtype, kernels), the
device layout, the compilation cache, every loop run (epochs, steps, each step's head lr, start, step budget),
every optimiser (its update of a fixed gradient at 3 steps, its state's structure, the trainable mask) and the
checkpoints it would save (which steps, which as best). The train step is a stand-in returning a fixed loss; the
validation numbers are fixed per epoch (error_rate and valid_loss disagree on the best epoch).
``data.*`` fields have their own walk in ``tests/data/test_data_fields.py``.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import TinyBundle  # noqa: E402

import jaxtl.data  # noqa: E402
from jaxtl import checkpoint, fit, learner, parallel, schedules  # noqa: E402
from jaxtl.config import (  # noqa: E402
    OPTIM_FIELD_NAMES,
    TRAIN_FIELD_RECIPES,
    ConfigWarning,
    base_config,
    field_paths,
    ignored_run_fields,
    validate,
)

RECIPES = tuple(schedules.RECIPES)
OTHER = {  # field -> another valid value
    "train.recipe": None,  # each other recipe (below)
    "train.epochs": 3, "train.freeze_epochs": 2, "train.lr": 1e-2, "train.lr_mult": 10.0, "train.pct_start": 0.5,
    "train.div": 10.0, "train.div_final": 1e3, "train.moms": (0.9, 0.8, 0.9), "train.batch_size": 8,
    "train.train_bn": False, "train.reset_opt_on_freeze": False,
    "train.precision": "bfloat16" if jax.default_backend() == "cpu" else "float32",  # not what "auto" picks here
    "train.parallel": "pmap", "train.metric": "valid_loss", "train.checkpoint": False,
    "train.max_steps": {"lr_find": 20, None: 3},  # per recipe: lr_find needs > 15 steps to suggest a rate
    "train.sync_every": 2,  # auto is 1 on the CPU
    "train.label_smoothing": 0.1, "train.mixup_alpha": 0.4, "train.cutmix_alpha": 1.0, "train.mix_prob": 0.5,
    "train.mix_switch_prob": 0.3, "train.mix_off_epoch": 1,  # the last three: only read with an alpha > 0
    "train.accum_steps": 2, "train.tta": 2,
    "train.ema_decay": 0.9, "train.ema_warmup": True, "train.eval_ema": False,  # the last two: with ema_decay > 0
    "train.compile_cache_dir": "<tmp>/other_xla", "train.distributed": True,
    "optim.name": "sgd", "optim.wd": 0.1, "optim.b2": 0.9, "optim.eps": 1e-3, "optim.nesterov": True,
    "model.arch": "resnet34", "model.pretrained": "", "model.head": "linear", "model.head_dropout": 0.2,
    "model.zero_init_residual": True, "model.weights_dir": "<tmp>/weights", "model.kernels": "plain",
}
SECTIONS = ("train.", "optim.", "model.")


def test_every_field_has_an_alternative():
    assert set(OTHER) == {f for f in field_paths(base_config()) if f.startswith(SECTIONS)}


def base(recipe: str, tmp: Path):
    c = base_config()
    c.data.source = "demo"
    c.model.arch, c.model.pretrained = "resnet18", "demo:resnet18"
    c.train.recipe, c.train.epochs, c.train.batch_size = recipe, 2, 4
    c.train.compile_cache_dir = str(tmp / "xla")
    if recipe == "lr_find":
        c.train.epochs = base_config().train.epochs  # lr_find does not read it
    return c


def set_field(c, field: str, value, tmp: Path):
    section, name = field.split(".")
    if isinstance(value, dict):  # per recipe
        value = value.get(str(c.train.recipe), value[None])
    if isinstance(value, str) and value.startswith("<tmp>"):
        value = str(tmp) + value[5:]
    c[section][name] = value
    return c


def _no_addresses(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def _opt_fingerprint(tx, mask, params) -> tuple:
    """The optimiser's updates of a fixed gradient over 3 steps (exact bytes), its state's structure, the mask."""
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype) + 0.001 * p, params)
    state, out = tx.init(params), []
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        out.append(b"".join(np.asarray(u).tobytes() for u in jax.tree.leaves(updates)))
    return (tuple(out), str(jax.tree_util.tree_structure(state)), tuple(jax.tree.leaves(mask)))


@pytest.fixture
def recorder(monkeypatch, tmp_path):
    """Patch the expensive boundaries; return ``effect(config) -> dict`` of what the run does."""
    events: dict = {}
    inits: dict = {}

    def fake_build_data(data_cfg, batch_size, seed, process_index=0, process_count=1, **kw):
        events["data"] = (batch_size, seed, process_index, process_count)
        bundle = TinyBundle(n_train=8, n_valid=4, batch_size=batch_size, size=32)
        bundle.description = "tiny"
        return bundle

    def init(model):
        key = _no_addresses(repr(model))
        if key not in inits:
            inits[key] = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
                jax.random.PRNGKey(0))
        return inits[key]

    def fake_load_pretrained(spec, arch, cache_dir=None):
        events["weights"] = (spec, arch, cache_dir)
        return {}

    def fake_make_train_step(model, tx, mask, axis_name=None, transform=None, regularise=None, ema=None,
                             accum_steps=1):
        params = fake_make_train_step.params
        if set(mask) != set(params):  # linear_probe: the head alone
            params = {k: params[k] for k in mask}
        events.setdefault("opt", []).append(_opt_fingerprint(tx, mask, params))
        events.setdefault("regularise", []).append((regularise, ema, accum_steps))

        def step(state, batch):
            return state, {"loss": jnp.float32(1.0)}

        return step

    original_run = learner.loop.Loop.run

    def spy_run(self, step, state, batches, plan, *args, **kwargs):
        label = kwargs.get("label", str)(0)
        events.setdefault("runs", []).append((plan.epochs, plan.steps_per_epoch, plan.lrs.tobytes(), plan.start,
                                              plan.max_steps, label))
        return original_run(self, step, state, batches, plan, *args, **kwargs)

    def fake_validate(self):
        e = self.data_epoch
        return {"valid_loss": [1.0, 0.5, 0.8][e % 3], "error_rate": [0.3, 0.4, 0.2][e % 3],
                "accuracy": 1 - [0.3, 0.4, 0.2][e % 3]}

    def fake_save(self, step, state, meta, *, best=False):
        events.setdefault("saves", []).append((step, best))

    monkeypatch.setattr(jaxtl.data, "build_data", fake_build_data)
    monkeypatch.setattr("jaxtl.convert.load_pretrained", fake_load_pretrained)
    monkeypatch.setattr("jaxtl.convert.init_with_pretrained", lambda model, key, pre, head, size: init(model))
    monkeypatch.setattr(fit, "make_train_step", fake_make_train_step)
    monkeypatch.setattr(parallel.DataParallel, "train_step", lambda self, fn: fn)
    monkeypatch.setattr(learner.loop.Loop, "run", spy_run)
    monkeypatch.setattr(learner.Learner, "validate", fake_validate)
    monkeypatch.setattr(learner.tta, "after_fit", lambda learn, n: events.update(tta=n) or {})
    monkeypatch.setattr(checkpoint.Checkpointer, "save", fake_save)
    old_cache = jax.config.jax_compilation_cache_dir

    def effect(c, workdir: Path) -> dict:
        events.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            learn = learner.Learner.from_config(c, workdir)
        events["cache_dir"] = jax.config.jax_compilation_cache_dir
        fake_make_train_step.params = learn.variables["params"]
        try:
            learner.run_recipe(learn, c)
        finally:
            learn.close()
            jax.config.update("jax_compilation_cache_dir", old_cache)
        return {**events, "model": _no_addresses(repr(learn.model)), "parallel": learn.par.mode,
                "sync_every": learn._loop.sync_every,
                "checkpointer": learn._ckpt is not None, "best": learn.best_metric}

    yield effect
    jax.config.update("jax_compilation_cache_dir", old_cache)


def _applies(field: str, c) -> bool:
    section, name = field.split(".")
    if section == "train":
        if name in ("mix_prob", "mix_off_epoch", "mix_switch_prob") and not (c.train.mixup_alpha > 0 or
                                                                             c.train.cutmix_alpha > 0):
            return False
        if name in ("ema_warmup", "eval_ema") and not c.train.ema_decay > 0:
            return False
        return str(c.train.recipe) in TRAIN_FIELD_RECIPES.get(name, RECIPES)
    if section == "optim":
        return str(c.optim.name) in OPTIM_FIELD_NAMES.get(name, (str(c.optim.name),))
    if name == "weights_dir":
        return bool(c.model.pretrained)
    if name == "head_dropout":
        return c.model.head == "fastai"
    return True


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_train_optim_model_field_changes_the_run_or_warns(recipe, recorder, tmp_path):
    ref = recorder(base(recipe, tmp_path), tmp_path / "ref")
    assert ref["runs"] and ref["opt"] and ref["weights"][0] == "demo:resnet18"
    fields = [f for f in OTHER if f != "train.recipe"]
    for i, field in enumerate(fields):
        c = set_field(base(recipe, tmp_path), field, OTHER[field], tmp_path)
        if field == "train.distributed":  # needs jaxtl.main to start JAX's distributed runtime: a clear error
            with pytest.raises(ValueError, match="train.distributed"):
                recorder(c, tmp_path / f"run{i}")
            continue
        if not _applies(field, c):
            msgs = ignored_run_fields(c)
            assert any(m.startswith(f"config field {field}=") for m in msgs), (recipe, field, msgs)
            with pytest.warns(ConfigWarning, match=re.escape(field)):
                validate(c)
            continue
        assert not [m for m in ignored_run_fields(c) if field in m], (recipe, field)
        got = recorder(c, tmp_path / f"run{i}")
        changed = sorted(k for k in set(ref) | set(got) if ref.get(k) != got.get(k))
        assert changed, f"{field}={OTHER[field]!r} changes nothing the {recipe} run does"
    for other in RECIPES:
        if other != recipe:
            c = set_field(base(recipe, tmp_path), "train.recipe", other, tmp_path)
            got = recorder(c, tmp_path / f"recipe-{other}")  # one_cycle / linear_probe: same loop, other model
            assert (got["runs"], got.get("opt")) != (ref["runs"], ref["opt"]), (recipe, other)


def test_fields_a_recipe_or_optimiser_ignores_warn_and_defaults_do_not():
    for recipe in RECIPES:
        assert ignored_run_fields(base(recipe, Path("/tmp"))) == []
    c = base("lr_find", Path("/tmp"))
    c.train.lr, c.optim.nesterov = 1e-3, True
    msgs = ignored_run_fields(c)
    assert any("train.lr=0.001" in m and "lr_find" in m for m in msgs)
    assert any("optim.nesterov=True" in m and "sgd" in m for m in msgs)
