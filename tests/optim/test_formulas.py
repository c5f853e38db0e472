"""jaxtl's optimisers equal the NumPy transcriptions of the papers / fastai over 100 steps, and the check bites."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl import optim
from jaxtl.reference import checks
from jaxtl.reference import optimizers as ref

RULES = {rule.name: rule for rule in checks.optimizer_rules()}


def _failed(results):
    return [r for r in results if not r.passed]


@pytest.mark.parametrize("name", list(RULES))
def test_rule_matches_transcription(name):
    results = checks.run_optimizer_rule(RULES[name])
    quantities = {r.quantity for r in results}
    assert {"params", "updates"} <= quantities
    assert quantities & {"mu", "nu", "trace"}, "optimiser moments were not compared"
    assert not _failed(results), checks.format_table(results)


def _rule(prefix):
    (rule,) = [r for n, r in RULES.items() if n.startswith(prefix)]
    return rule


def test_eps_inside_sqrt_transcription_fails():
    """A deliberately wrong transcription (eps inside the square root) must fail the Adam check."""
    rule = _rule("Adam (Kingma & Ba")
    wrong = lambda: ref.AdamW(checks.LR_MAX, b2=0.999, eps=1e-8, lam=0.0, eps_inside_sqrt=True)
    bad = {r.quantity: r for r in _failed(checks.run_optimizer_rule(rule, make_ref=wrong))}
    assert {"params", "updates"} <= set(bad)
    assert bad["updates"].max_rel_diff > 100 * bad["updates"].tolerance
    # and with fastai's eps = 1e-5 on the fastai rule
    wrong_fastai = lambda: ref.AdamW(checks.LR_MAX, b2=0.99, eps=1e-5, lam=0.01 * checks.LR_MAX,
                                     no_decay=checks._no_decay(), eps_inside_sqrt=True)
    assert "updates" in {r.quantity for r in _failed(checks.run_optimizer_rule(_rule("fastai Adam"),
                                                                                make_ref=wrong_fastai))}


@pytest.mark.parametrize("prefix, wrong", [
    # weight decay forgotten
    ("AdamW", lambda: ref.AdamW(checks.LR_MAX, b2=0.99, eps=1e-5, lam=0.0)),
    # weight decay applied to norm parameters and biases too
    ("fastai Adam", lambda: ref.FastaiAdam(0.99, 1e-5, 0.01)),
    # LAMB variants swapped: paper LAMB checked against the norm without the decay term (fastai's choice) ...
    ("LAMB (You et al., Alg. 2), wd=0.01",
     lambda: ref.Lamb(0.999, 1e-6, 0.01, no_decay=checks._no_decay(), exclude_decay_from_norm=True)),
    # ... and fastai's Lamb checked against the paper's trust ratio
    ("fastai Lamb, wd=0.01", lambda: ref.Lamb(0.99, 1e-5, 0.01, no_decay=checks._no_decay())),
    # momentum schedule ignored (constant 0.9)
    ("SGD momentum", lambda: _ConstMom(ref.SGD(False, 0.01, no_decay=checks._no_decay()), 0.9)),
    # Nesterov forgotten
    ("SGD Nesterov", lambda: ref.SGD(False, 0.0)),
    # frozen leaves stepped like the others
    ("adam per-group lrs, freeze_to(1)", lambda: ref.FastaiAdam(0.99, 1e-5, 0.01, no_decay=checks._no_decay())),
])
def test_wrong_transcriptions_fail(prefix, wrong):
    assert _failed(checks.run_optimizer_rule(_rule(prefix), make_ref=wrong))


class _ConstMom:
    """Wraps a transcription and replaces the scheduled momentum with a constant (a wrong transcription)."""

    def __init__(self, inner: ref._Ref, mom: float) -> None:
        self.inner, self.mom = inner, mom
        self.momentum_name, self.state, self.frozen = inner.momentum_name, inner.state, inner.frozen

    def step(self, params, grads, lr, **hyper):
        return self.inner.step(params, grads, lr, **{self.momentum_name: self.mom})


# ---------------------------------------------------------------------------------- trust-ratio edge cases


def _one_update(tx, p, g):
    state = tx.init(p)
    u, _ = tx.update(g, state, p)
    return u


def test_lamb_zero_norm_layers():
    """||x|| = 0 -> ratio 1 (the update is the Adam direction r); r = 0 and x = 0 -> no update at all."""
    lr = 0.1
    p = {"a": {"kernel": jnp.zeros((4, 3))}, "b": {"kernel": jnp.zeros((5,))}}
    g = {"a": {"kernel": jnp.linspace(-1.0, 2.0, 12).reshape(4, 3)}, "b": {"kernel": jnp.zeros((5,))}}
    for tx, eps in ((optim.lamb(lr, weight_decay=0.01), 1e-6), (optim.lamb_fastai(lr, weight_decay=0.01), 1e-5)):
        u = _one_update(tx, p, g)
        r = np.asarray(g["a"]["kernel"]) / (np.abs(np.asarray(g["a"]["kernel"])) + eps)  # step 1: m^ = g, v^ = g^2
        np.testing.assert_allclose(np.asarray(u["a"]["kernel"]), -lr * r, rtol=2e-5)
        np.testing.assert_array_equal(np.asarray(u["b"]["kernel"]), np.zeros(5))


def test_lamb_fastai_ratio_capped_at_10_and_paper_not():
    lr = 1e-3
    p = {"w": {"kernel": jnp.full((8,), 100.0)}}
    g = {"w": {"kernel": jnp.full((8,), 0.5)}}
    u_fastai = np.asarray(_one_update(optim.lamb_fastai(lr), p, g)["w"]["kernel"])
    r = 0.5 / (0.5 + 1e-5)  # m^ / (sqrt(v^) + eps) at step 1
    np.testing.assert_allclose(u_fastai, -lr * 10.0 * r * np.ones(8), rtol=1e-6)  # ||x||/||r|| ~ 100, capped
    u_paper = np.asarray(_one_update(optim.lamb(lr), p, g)["w"]["kernel"])
    np.testing.assert_allclose(u_paper, -lr * 100.0 * np.ones(8), rtol=1e-6)  # no cap in the paper / optax


def test_lamb_fastai_trust_ratio_uses_decayed_weights():
    lr, wd = 0.5, 0.4  # decay factor 1 - lr*wd = 0.8, large enough to see
    p = {"w": {"kernel": jnp.asarray([3.0, 4.0])}}
    g = {"w": {"kernel": jnp.asarray([1.0, -1.0])}}
    u = np.asarray(_one_update(optim.lamb_fastai(lr, weight_decay=wd, eps=0.0), p, g)["w"]["kernel"])
    x = np.array([3.0, 4.0])
    r = np.array([1.0, -1.0])  # m^/sqrt(v^) at step 1 with eps = 0
    q = min(np.linalg.norm(0.8 * x) / np.linalg.norm(r), 10)
    np.testing.assert_allclose(u, -lr * wd * x - lr * q * r, rtol=1e-6)


def test_scheduled_b1_is_used():
    """b1 from a schedule enters both the moment and the bias correction 1 - b1_t^t (fastai's debias)."""
    sched = lambda count: jnp.where(count == 0, 0.5, 0.8)
    tx = optim.adam(1.0, b1=sched, b2=0.99, eps=0.0, weight_decay=0.0)
    p = {"w": {"kernel": jnp.zeros(1)}}
    state = tx.init(p)
    g1, g2 = 2.0, -1.0
    _, state = tx.update({"w": {"kernel": jnp.asarray([g1])}}, state, p)
    u, state = tx.update({"w": {"kernel": jnp.asarray([g2])}}, state, p)
    m = 0.8 * (0.5 * g1) + 0.2 * g2
    v = 0.99 * 0.01 * g1**2 + 0.01 * g2**2
    want = -(m / (1 - 0.8**2)) / np.sqrt(v / (1 - 0.99**2))
    np.testing.assert_allclose(np.asarray(u["w"]["kernel"]), [want], rtol=1e-5)
    assert float(state.hyperparams["b1"]) == pytest.approx(0.8)


def test_optimizers_are_optax_transformations():
    for tx in (optim.adam(1e-3), optim.lamb(1e-3), optim.lamb_fastai(1e-3), optim.sgd(1e-3, nesterov=True)):
        assert isinstance(tx, optax.GradientTransformation)


def test_check_script_exit_code(monkeypatch, capsys):
    """scripts/check_formulas.py prints every row and exits non-zero when one fails."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "check_formulas.py"
    spec = importlib.util.spec_from_file_location("check_formulas_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ok = checks.CheckResult("rule a", "updates", 1e-9, 1e-7, 1e-6, "jaxtl/x.py")
    bad = checks.CheckResult("rule b", "params", 1e-3, 1e-2, 1e-6, "jaxtl/y.py")
    monkeypatch.setattr(script.checks, "run_all", lambda: [ok])
    assert script.main([]) == 0
    monkeypatch.setattr(script.checks, "run_all", lambda: [ok, bad])
    assert script.main(["--markdown"]) == 1
    out = capsys.readouterr().out
    assert "rule b" in out and "FAIL" in out and "1/2 checks passed" in out
