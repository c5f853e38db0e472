"""build_optimizer: per-group lrs, frozen leaves untouched, optimiser state kept or reset across phases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl import groups, optim, schedules
from jaxtl.config import base_config
from jaxtl.reference import checks

NAMES = ("adam", "lamb", "lamb_fastai", "sgd")


def _cfg(name, wd=0.01):
    cfg = base_config().optim
    cfg.name, cfg.wd = name, wd
    return cfg


@pytest.fixture(scope="module")
def problem():
    params0, grads = checks.make_problem(seed=1, n_steps=6)
    tree = checks.flat_to_tree({k: jnp.asarray(v) for k, v in params0.items()})
    # every leaf receives a gradient here, so that only freezing can keep a leaf still
    grads = [checks.flat_to_tree({k: jnp.asarray(v + 0.01) for k, v in g.items()}) for g in grads]
    return tree, grads


def _run(tx, tree, grads, state=None):
    state = tx.init(tree) if state is None else state
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, tree)
        tree = optax.apply_updates(tree, updates)
    return tree, state


def _flat(tree):
    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("n_frozen, train_bn", [(-1, True), (1, False)])
def test_frozen_leaves_bit_identical_trainable_move(problem, name, keep, n_frozen, train_bn):
    tree, grads = problem
    lr_s, mom_s = schedules.one_cycle(len(grads), [1e-3, 2e-3, 3e-3])
    tx = optim.build_optimizer(_cfg(name), tree, schedules.split_schedule(lr_s, 3), mom_s,
                               groups.trainable_mask(tree, n_frozen, train_bn), keep)
    new, _ = _run(tx, tree, grads)
    before, after = _flat(tree), _flat(new)
    trainable = _flat(groups.trainable_mask(tree, n_frozen, train_bn))
    assert not all(trainable.values()) and any(trainable.values())
    for k, is_trainable in trainable.items():
        if is_trainable:
            assert not np.array_equal(after[k], before[k]), f"{k} did not move"
        else:
            assert after[k].tobytes() == before[k].tobytes(), f"frozen {k} changed"


def test_per_group_learning_rates(problem):
    """One SGD step without momentum or decay: update = -lr_group * g, lr_group from even_mults."""
    tree, grads = problem
    lrs = groups.lr_for_groups(slice(1e-4, 1e-2))
    cfg = _cfg("sgd", wd=0.0)
    tx = optim.build_optimizer(cfg, tree, lrs, momentum_schedule=0.0)
    updates, _ = tx.update(grads[0], tx.init(tree), tree)
    g, u = _flat(grads[0]), _flat(updates)
    for leaf in checks.LEAVES:
        np.testing.assert_allclose(u[leaf.path], -lrs[leaf.group] * g[leaf.path], rtol=1e-6)
    np.testing.assert_allclose(lrs, [1e-4, 1e-3, 1e-2], rtol=1e-14)


def test_keep_state_structure_is_independent_of_freezing(problem):
    tree, _ = problem
    lrs = [1e-3] * 3
    for name in NAMES:
        structures = {jax.tree_util.tree_structure(
            optim.build_optimizer(_cfg(name), tree, lrs, None, groups.trainable_mask(tree, n, bn),
                                  keep_state_structure=True).init(tree))
            for n in (-1, 0, 1) for bn in (True, False)}
        assert len(structures) == 1, name
        # fastai's layout (reset on freeze) has no state for frozen leaves, so it differs
        default = {jax.tree_util.tree_structure(optim.build_optimizer(
            _cfg(name), tree, lrs, None, groups.trainable_mask(tree, n)).init(tree))
                   for n in (-1, 0)}
        assert len(default) == 2, name


def test_state_carried_across_phases(problem):
    """freeze() phase then unfreeze() phase with the same opt_state (train.reset_opt_on_freeze=False)."""
    tree, grads = problem
    cfg = _cfg("adam")
    lr1, mom1 = schedules.one_cycle(len(grads), [1e-3] * 3, pct_start=0.99)
    tx1 = optim.build_optimizer(cfg, tree, schedules.split_schedule(lr1, 3), mom1,
                                groups.trainable_mask(tree, -1, False), True)
    tree1, state1 = _run(tx1, tree, grads)

    mu_all = {}
    for _, sub in optax.tree_utils.tree_get_all_with_path(state1, "mu"):
        mu_all.update(_flat(sub))
    trainable = _flat(groups.trainable_mask(tree, -1, False))
    for k, t in trainable.items():
        assert np.any(mu_all[k] != 0) == t, k  # frozen leaves' moments stayed at their initial zeros

    def injected(state):  # group label -> that group's InjectStatefulHyperparamsState
        return {g: s.inner_state for g, s in state.inner_states.items()}

    for g, inj in injected(state1).items():
        assert int(inj.count) == len(grads)
        # Adam's count advances only in groups with a trainable leaf (freeze() without train_bn: the head)
        assert int(inj.inner_state[0].count) == (len(grads) if g == "g2" else 0)

    # phase 2: new optimiser (unfrozen, new lrs), same state after restarting the schedules
    lr2, mom2 = schedules.one_cycle(len(grads), [1e-5, 1e-4, 1e-3], pct_start=0.3, div=5.0)
    tx2 = optim.build_optimizer(cfg, tree1, schedules.split_schedule(lr2, 3), mom2,
                                groups.trainable_mask(tree1, 0, True), True)
    state2 = optim.restart_schedules(state1)
    assert jax.tree_util.tree_structure(state2) == jax.tree_util.tree_structure(tx2.init(tree1))
    for g, inj in injected(state2).items():
        assert int(inj.count) == 0 and all(int(h.count) == 0 for h in inj.hyperparams_states.values())
        assert int(inj.inner_state[0].count) == (len(grads) if g == "g2" else 0)  # carried
    updates, state3 = jax.jit(tx2.update)(grads[0], state2, tree1)
    for g, inj in injected(state3).items():
        k = int(g[1:])
        assert float(inj.hyperparams["learning_rate"]) == pytest.approx(float(lr2(0)[k]), rel=1e-6)
        assert float(inj.hyperparams["b1"]) == pytest.approx(0.95, rel=1e-6)
    assert all(np.any(v != 0) for v in _flat(updates).values())


def test_restart_schedules_resets_only_schedule_counts(problem):
    tree, grads = problem
    tx = optim.adam(lambda c: 1e-3 * (c + 1), b1=lambda c: 0.9 - 0.01 * c)
    _, state = _run(tx, tree, grads[:3])
    assert int(state.count) == 3 and int(state.inner_state[0].count) == 3
    state = optim.restart_schedules(state)
    assert int(state.count) == 0 and int(state.inner_state[0].count) == 3
    assert all(int(s.count) == 0 for s in state.hyperparams_states.values())
    _, state = tx.update(grads[0], state, tree)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-3)
    assert float(state.hyperparams["b1"]) == pytest.approx(0.9)


def test_freeze_leaves_all_frozen_keeps_state(problem):
    tree, grads = problem
    tx = optim.adam(1e-3, trainable=lambda t: jax.tree_util.tree_map(lambda _: False, t))
    state0 = tx.init(tree)
    updates, state1 = tx.update(grads[0], state0, tree)
    assert all(not np.any(v) for v in _flat(updates).values())
    assert int(state1.inner_state[0].count) == 0  # the inner optimiser did not step at all
    assert int(state1.count) == 1  # but the schedule position advanced


def test_build_optimizer_errors(problem):
    tree, _ = problem
    with pytest.raises(ValueError, match="one per layer group"):
        optim.build_optimizer(_cfg("adam"), tree, [1e-3, 1e-3])
    with pytest.raises(ValueError, match="not known"):
        optim.build_optimizer(_cfg("adamax"), tree, [1e-3] * 3)


def test_resnet_tree_from_eval_shape():
    """build_optimizer works on a real ResNet-18 tree; frozen convs get no optimiser state in fastai's layout."""
    from jaxtl.models import create_model

    model = create_model("resnet18", 5)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    tx = optim.build_optimizer(_cfg("adam"), params, [1e-3] * 3, None, groups.trainable_mask(params, -1, True))
    state = jax.eval_shape(tx.init, params)
    n_mu = sum(len(jax.tree_util.tree_leaves(s)) for _, s in optax.tree_utils.tree_get_all_with_path(state, "mu"))
    n_trainable = sum(jax.tree_util.tree_leaves(groups.trainable_mask(params, -1, True)))
    assert n_mu == n_trainable < len(jax.tree_util.tree_leaves(params))
