"""The weights' moving average (jaxtl/ema.py) against a NumPy transcription of timm's ModelEmaV3
(jaxtl/reference/ema.py): the formula, inside the train step with BatchNorm statistics, and in the Learner
(validation on the EMA, checkpoints carry it)."""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl import ema
from jaxtl.config import base_config, ignored_run_fields, validate
from jaxtl.reference import ema as ref
from jaxtl.train import TrainState, make_train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import TinyBundle  # noqa: E402


def test_decay_and_average_match_timm_within_1e_6():
    rows = ref.check_rows()
    assert len(rows) == 6
    for rule, q, _, rel, tol, _ in rows:
        assert rel <= tol, (rule, q, rel)


@pytest.mark.parametrize("mutation", ["no_first_copy", "warmup_power", "decay_as_weight"])
def test_the_checks_fail_when_the_average_is_wrong(monkeypatch, mutation):
    real_decay, real_update = ema.Ema.decay_at, ema.Ema.update
    if mutation == "no_first_copy":  # decay from the first update on (timm copies the weights first)
        monkeypatch.setattr(ema.Ema, "decay_at", lambda self, t: jnp.full(jnp.shape(t), self.decay, jnp.float32))
    elif mutation == "warmup_power":
        monkeypatch.setattr(ema.Ema, "decay_at", lambda self, t: real_decay(
            ema.Ema(self.decay, self.warmup, self.gamma, 0.75), t))
    else:  # the weights' share taken as the decay
        monkeypatch.setattr(ema.Ema, "update", lambda self, a, w, t: optax.incremental_update(
            w, a, self.decay_at(t)))
    assert real_update is not None
    assert any(rel > tol for _, _, _, rel, tol, _ in ref.check_rows())


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(x.mean((1, 2)))


@pytest.mark.parametrize("warmup", [False, True])
def test_train_step_averages_params_and_batchnorm_statistics(warmup):
    model, cfg = ConvBN(), ema.Ema(0.8, warmup)
    rng = np.random.default_rng(0)
    batches = [{"image": jnp.asarray(rng.standard_normal((4, 6, 6, 3)), jnp.float32),
                "label": jnp.asarray(rng.integers(0, 3, 4), jnp.int32)} for _ in range(6)]
    v = model.init(jax.random.PRNGKey(0), batches[0]["image"], train=False)
    tx = optax.adam(0.05)
    state = TrainState.create(v["params"], v["batch_stats"], tx, jax.random.PRNGKey(1)).replace(ema=ema.start(v))
    step = jax.jit(make_train_step(model, tx, jax.tree.map(lambda _: True, v["params"]), ema=cfg))
    seen = []
    for b in batches:
        state, _ = step(state, b)
        seen.append(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
    flat = [{jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(w)} for w in seen]
    want = ref.timm_average(flat, cfg.decay, warmup)
    got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state.ema))}
    assert got.keys() == want.keys() and any("batch_stats" in k for k in got)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # the average trails the weights (a test that would pass with ema = weights is not a test)
    assert max(float(np.abs(got[k] - flat[-1][k]).max()) for k in got) > 1e-3


def test_learner_validates_and_exports_the_ema_and_loads_it(tmp_path):
    from jaxtl.learner import Learner
    from jaxtl.models import create_model

    model = create_model("resnet18", 3)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))
    c = base_config()
    c.model.arch, c.train.batch_size, c.train.ema_decay = "resnet18", 4, 0.5
    learn = Learner(model, v, TinyBundle(n_train=12), c, tmp_path)
    learn.fit_one_cycle(1, 1e-2)
    assert learn.eval_ema
    with_ema = learn.validate()
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(leaves(learn.eval_variables), leaves(learn.state.ema),
                                                     strict=True))
    learn.eval_ema = False
    raw = learn.validate()
    assert with_ema != raw  # 3 steps at decay 0.5: the average differs from the weights
    learn.state = learn.state.replace(params=learn.state.ema["params"], batch_stats=learn.state.ema["batch_stats"])
    assert learn.validate() == with_ema  # validation with eval_ema is validation of the EMA weights
    # Learner.load restores the EMA the checkpoint carries
    saved = jax.device_get(learn.state.ema)
    learn.state = learn.state.replace(ema=jax.tree.map(jnp.zeros_like, learn.state.ema))
    learn.load(best=False)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(learn.state.ema), leaves(saved), strict=True))
    learn.close()


def test_config_rejects_bad_decay_and_warns_about_ema_fields_without_it():
    c = base_config()
    c.data.source, c.train.ema_decay = "demo", 1.0
    with pytest.raises(ValueError, match=r"train\.ema_decay must be in \[0, 1\)"):
        validate(c)
    c = base_config()
    c.train.ema_warmup, c.train.eval_ema = True, False
    msgs = ignored_run_fields(c)
    assert any("train.ema_warmup=True" in m for m in msgs) and any("train.eval_ema=False" in m for m in msgs)
    c.train.ema_decay = 0.999
    assert not [m for m in ignored_run_fields(c) if "ema" in m]
