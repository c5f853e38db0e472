"""Checks: jaxtl's optimisers and schedules against the NumPy transcriptions, step by step.

Every optimiser rule runs jaxtl (float32, jitted ``update``) and a transcription (float64) side by side for
``N_STEPS`` steps on the same random parameter tree and gradient sequence, and compares parameters, updates and
optimiser moments at every step. The tree (``LEAVES``) has ResNet-style paths with hand-written group,
decay and norm flags, a zero-initialised layer (||x|| = 0 at step 1), a layer whose parameters and gradients
stay zero (both LAMB norms 0), a layer with zero gradients (update norm 0 without decay), and gradient
scales from 1 down to 1e-7 so that ε matters. Learning rate and momentum follow a one-cycle schedule
computed independently in float64.

Difference measure, per quantity: for each step and leaf ``|jaxtl - ref|_inf / |ref|_inf`` (0 when both are
exactly 0); a rule passes when the maximum over steps and leaves is within its tolerance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl import groups, metrics, optim, schedules
from jaxtl.config import base_config
from jaxtl.convert.io import unflatten
from jaxtl.reference import optimizers as ref_opt
from jaxtl.reference import schedules as ref_sched

N_STEPS = 100
LR_MAX = 1e-2
MOMS = (0.95, 0.85, 0.95)
GROUP_LR_MAX = (1e-4, 1e-3, 1e-2)  # even_mults(1e-4, 1e-2, 3)

# Relative tolerances, float32 jaxtl vs float64 transcription over N_STEPS steps.
EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
TOL_BASE = 5e-6  # moments, updates, parameters: float32 roundings (measured <= 2.5e-6)
TOL_SCHEDULE = 1e-6  # schedules: one float32 evaluation (measured <= 4.2e-7)


def bias_correction_allowance(b2: float | None) -> float:
    """Extra tolerance on updates/parameters for Adam-type rules.

    optax evaluates ``1 - b2**t`` in float32; for b2 near 1 that difference of nearly equal numbers carries a
    relative error up to ``EPS32 / (1 - b2)`` in the first steps, halved by the square root in the update:
    ~6e-5 for b2 = 0.999, ~6e-6 for b2 = 0.99. fastai computes it in float64 (Python floats).
    """
    return 0.0 if b2 is None else EPS32 / (2 * (1 - b2))


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: str
    shape: tuple[int, ...]
    group: int  # fastai layer group, written out by hand (independent of jaxtl.groups)
    decay: bool  # weight decay applies (not a norm parameter, not a bias)
    norm: bool  # normalisation parameter (trains in frozen groups when train_bn)
    init: str  # "normal" | "ones" | "zeros"
    grad_scale: float  # 0 = this leaf never receives a gradient


LEAVES: tuple[Leaf, ...] = (
    Leaf("body/conv1/kernel", (3, 3, 3, 8), 0, True, False, "normal", 1.0),
    Leaf("body/bn1/scale", (8,), 0, False, True, "ones", 1e-2),
    Leaf("body/bn1/bias", (8,), 0, False, True, "zeros", 1e-3),  # ||x|| = 0 at the first step
    Leaf("body/layer2_0/conv1/kernel", (3, 3, 8, 8), 0, True, False, "normal", 1e-4),
    Leaf("body/layer3_0/conv1/kernel", (3, 3, 8, 16), 1, True, False, "normal", 1e-5),
    Leaf("body/layer3_0/bn1/scale", (16,), 1, False, True, "ones", 1e-6),
    Leaf("body/layer3_0/bn1/bias", (16,), 1, False, True, "normal", 1e-7),
    Leaf("body/layer4_0/conv2/kernel", (3, 3, 4, 4), 1, True, False, "zeros", 0.0),  # x = 0 and g = 0 throughout
    Leaf("head/fc1/kernel", (32, 16), 2, True, False, "normal", 1e-1),
    Leaf("head/fc1/bias", (16,), 2, False, False, "normal", 1e-3),
    Leaf("head/fc2/kernel", (16, 4), 2, True, False, "normal", 0.0),  # x != 0, g = 0: update norm 0 without decay
)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    rule: str
    quantity: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    source: str

    @property
    def passed(self) -> bool:
        return bool(self.max_rel_diff <= self.tolerance)


# ------------------------------------------------------------------------------------------ test data


flat_to_tree = unflatten  # {'body/conv1/kernel': x} -> nested dict (jaxtl/convert/io.py)


def tree_to_flat(tree: Any) -> dict[str, np.ndarray]:
    out = {}
    for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(k.key) for k in path)] = np.asarray(v)
    return out


def make_problem(seed: int = 0, n_steps: int = N_STEPS) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Float32 initial parameters and a sequence of gradients (persistent direction + noise, per-leaf scale)."""
    rng = np.random.default_rng(seed)
    params, drift = {}, {}
    for leaf in LEAVES:
        if leaf.init == "normal":
            params[leaf.path] = (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        else:
            params[leaf.path] = np.full(leaf.shape, 1.0 if leaf.init == "ones" else 0.0, np.float32)
        drift[leaf.path] = rng.standard_normal(leaf.shape)
    grads = []
    for _ in range(n_steps):
        grads.append({leaf.path: (leaf.grad_scale * (drift[leaf.path] + rng.standard_normal(leaf.shape)))
                      .astype(np.float32) for leaf in LEAVES})
    return params, grads


# ------------------------------------------------------------------------------------------ comparison


def _rel(a: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    diff = float(np.max(np.abs(np.asarray(a, np.float64) - r))) if r.size else 0.0
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    if diff == 0.0:
        return 0.0, 0.0
    return diff, diff / scale if scale > 0 else float("inf")


class _Acc:
    def __init__(self) -> None:
        self.abs: dict[str, float] = {}
        self.rel: dict[str, float] = {}

    def add(self, quantity: str, a: np.ndarray, r: np.ndarray) -> None:
        d, rel = _rel(a, r)
        self.abs[quantity] = max(self.abs.get(quantity, 0.0), d)
        self.rel[quantity] = max(self.rel.get(quantity, 0.0), rel)


_MOMENTS = {"mu": ("m", "grad_avg"), "nu": ("v", "sqr_avg"), "trace": ("b",)}


def _moments(state: Any) -> dict[str, dict[str, np.ndarray]]:
    """jaxtl moment trees (mu / nu / trace) found anywhere in ``state``, merged over partition groups, flattened.

    The leaves ``optax.partition`` gave to another group are ``MaskedNode``s (no leaves), so paths do not clash.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in _MOMENTS:
        for _, sub in optax.tree_utils.tree_get_all_with_path(state, name):
            for path, v in jax.tree_util.tree_flatten_with_path(sub)[0]:
                out.setdefault(name, {})["/".join(str(k.key) for k in path)] = np.asarray(v)
    return out


@dataclasses.dataclass
class OptRule:
    """One optimiser rule: how to build jaxtl's transformation and the transcription, and the schedules."""

    name: str
    source: str
    make_jaxtl: Callable[[dict], optax.GradientTransformation]
    make_ref: Callable[[], ref_opt._Ref]
    lr_max: Sequence[float] = (LR_MAX,) * 3  # per group
    scheduled_momentum: bool = True
    constant_momentum: float = 0.9
    compare_state: bool = True
    b2: float | None = None  # Adam-type rules: widens the update/parameter tolerance, see bias_correction_allowance


def run_optimizer_rule(rule: OptRule, make_ref: Callable[[], ref_opt._Ref] | None = None, seed: int = 0,
                       n_steps: int = N_STEPS) -> list[CheckResult]:
    """Run jaxtl and the transcription side by side; ``make_ref`` overrides the rule's (to test a wrong one).

    Two transcription instances run: one free-running from the same initial parameters (its trajectory is
    compared with jaxtl's parameters), and one fed jaxtl's parameters before every step (its updates and
    moments are compared with jaxtl's, so that a decay term that nearly cancels the gradient term does not
    turn the float32 drift of the parameters into a large relative difference of the update).
    """
    make_ref = make_ref or rule.make_ref
    params0, grads = make_problem(seed, n_steps)
    free, forced = make_ref(), make_ref()
    tree = flat_to_tree({k: jnp.asarray(v) for k, v in params0.items()})
    tx = rule.make_jaxtl(tree)
    state = tx.init(tree)
    update = jax.jit(tx.update)

    group_of = {leaf.path: leaf.group for leaf in LEAVES}
    lr_vals = [ref_sched.one_cycle_values(n_steps, lr, pct_start=0.25, moms=MOMS)[0] for lr in rule.lr_max]
    mom_vals = ref_sched.one_cycle_values(n_steps, 1.0, moms=MOMS)[1]

    acc = _Acc()
    free_params: dict[str, np.ndarray] = {k: v.astype(np.float64) for k, v in params0.items()}
    for t in range(n_steps):
        before = tree_to_flat(tree)
        g_tree = flat_to_tree({k: jnp.asarray(v) for k, v in grads[t].items()})
        updates, state = update(g_tree, state, tree)
        tree = optax.apply_updates(tree, updates)

        lr = {k: lr_vals[group_of[k]][t] for k in params0}
        hyper = {free.momentum_name: mom_vals[t] if rule.scheduled_momentum else rule.constant_momentum}
        free_params, _ = free.step(free_params, grads[t], lr, **hyper)
        _, forced_updates = forced.step(before, grads[t], lr, **hyper)

        flat_p, flat_u = tree_to_flat(tree), tree_to_flat(updates)
        for k in params0:
            acc.add("params", flat_p[k], free_params[k])
            acc.add("updates", flat_u[k], forced_updates[k])
        if rule.compare_state:
            for name, flat in _moments(state).items():
                for k, v in flat.items():
                    if k in forced.frozen:  # never stepped: state must still be the initial zeros
                        acc.add(name, v, np.zeros(v.shape))
                        continue
                    ref_key = next((s for s in _MOMENTS[name] if s in forced.state.get(k, {})), None)
                    if ref_key is not None:
                        acc.add(name, v, forced.state[k][ref_key])
    results = []
    for q in acc.rel:
        tol = TOL_BASE + (bias_correction_allowance(rule.b2) if q in ("params", "updates") else 0.0)
        results.append(CheckResult(rule.name, q, acc.abs[q], acc.rel[q], tol, rule.source))
    return results


# ------------------------------------------------------------------------------------------ rules


def _one_cycle(lr_max: float | Sequence[float]) -> tuple[Callable, Callable]:
    return schedules.one_cycle(N_STEPS, lr_max, pct_start=0.25, moms=MOMS)


def _no_decay() -> set[str]:
    return {leaf.path for leaf in LEAVES if not leaf.decay}


def _frozen(n_frozen: int, train_bn: bool) -> set[str]:
    return {leaf.path for leaf in LEAVES if leaf.group < n_frozen and not (train_bn and leaf.norm)}


def _optim_cfg(name: str, wd: float, b2: float, eps: float, nesterov: bool = False) -> Any:
    cfg = base_config().optim
    cfg.name, cfg.wd, cfg.b2, cfg.eps, cfg.nesterov = name, wd, b2, eps, nesterov
    return cfg


def optimizer_rules() -> list[OptRule]:
    lr_s, mom_s = _one_cycle(LR_MAX)
    src = "jaxtl/optim/transforms.py"
    rules = [
        OptRule("Adam (Kingma & Ba, Alg. 1), wd=0, b1=0.9, b2=0.999, eps=1e-8", f"{src}:adam",
                lambda p: optim.adam(lr_s, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
                lambda: ref_opt.AdamW(LR_MAX, b2=0.999, eps=1e-8, lam=0.0),
                scheduled_momentum=False, b2=0.999),
        OptRule("AdamW (Loshchilov & Hutter, Alg. 2), wd=0.01, scheduled b1", f"{src}:adam",
                lambda p: optim.adam(lr_s, b1=mom_s, b2=0.99, eps=1e-5, weight_decay=0.01),
                lambda: ref_opt.AdamW(LR_MAX, b2=0.99, eps=1e-5, lam=0.01 * LR_MAX, no_decay=_no_decay()), b2=0.99),
        OptRule("fastai Adam (defaults), scheduled mom", f"{src}:adam",
                lambda p: optim.adam(lr_s, b1=mom_s),
                lambda: ref_opt.FastaiAdam(sqr_mom=0.99, eps=1e-5, wd=0.01, no_decay=_no_decay()), b2=0.99),
        OptRule("LAMB (You et al., Alg. 2), wd=0.01, optax defaults", f"{src}:lamb",
                lambda p: optim.lamb(lr_s, b1=mom_s, weight_decay=0.01),
                lambda: ref_opt.Lamb(b2=0.999, eps=1e-6, lam=0.01, no_decay=_no_decay()), b2=0.999),
        OptRule("LAMB (You et al., Alg. 2), wd=0", f"{src}:lamb",
                lambda p: optim.lamb(lr_s, b1=mom_s, weight_decay=0.0),
                lambda: ref_opt.Lamb(b2=0.999, eps=1e-6, lam=0.0), b2=0.999),
        OptRule("fastai Lamb, wd=0.01, fastai defaults", f"{src}:lamb_fastai",
                lambda p: optim.lamb_fastai(lr_s, b1=mom_s, weight_decay=0.01),
                lambda: ref_opt.FastaiLamb(sqr_mom=0.99, eps=1e-5, wd=0.01, no_decay=_no_decay()), b2=0.99),
        OptRule("fastai Lamb, wd=0", f"{src}:lamb_fastai",
                lambda p: optim.lamb_fastai(lr_s, b1=mom_s),
                lambda: ref_opt.FastaiLamb(sqr_mom=0.99, eps=1e-5, wd=0.0), b2=0.99),
        OptRule("SGD momentum, wd=0.01, scheduled momentum", f"{src}:sgd",
                lambda p: optim.sgd(lr_s, momentum=mom_s, weight_decay=0.01),
                lambda: ref_opt.SGD(nesterov=False, wd=0.01, no_decay=_no_decay())),
        OptRule("SGD Nesterov, wd=0", f"{src}:sgd",
                lambda p: optim.sgd(lr_s, momentum=mom_s, nesterov=True),
                lambda: ref_opt.SGD(nesterov=True, wd=0.0)),
    ]
    # per-group lrs + frozen leaves through build_optimizer (both state layouts)
    glr, gmom = _one_cycle(list(GROUP_LR_MAX))
    group_lrs = schedules.split_schedule(glr, 3)
    bsrc = "jaxtl/optim/build.py:build_optimizer"
    for name, keep, n_frozen, train_bn, make_ref in (
        ("adam", False, 1, True, lambda fr: ref_opt.FastaiAdam(0.99, 1e-5, 0.01, frozen=fr, no_decay=_no_decay())),
        ("adam", True, 2, False, lambda fr: ref_opt.FastaiAdam(0.99, 1e-5, 0.01, frozen=fr, no_decay=_no_decay())),
        ("lamb_fastai", True, 1, True,
         lambda fr: ref_opt.FastaiLamb(0.99, 1e-5, 0.01, frozen=fr, no_decay=_no_decay())),
        ("sgd", False, 2, True, lambda fr: ref_opt.SGD(False, 0.01, frozen=fr, no_decay=_no_decay())),
    ):
        cfg = _optim_cfg(name, 0.01, 0.99, 1e-5)
        fr = _frozen(n_frozen, train_bn)
        rules.append(OptRule(
            f"{name} per-group lrs, freeze_to({n_frozen}), train_bn={train_bn}, keep_state={keep}", bsrc,
            lambda p, cfg=cfg, keep=keep, n=n_frozen, bn=train_bn: optim.build_optimizer(
                cfg, p, group_lrs, gmom, groups.trainable_mask(p, n, bn), keep_state_structure=keep),
            lambda make_ref=make_ref, fr=fr: make_ref(fr), lr_max=GROUP_LR_MAX,
            b2=None if name == "sgd" else 0.99))
    return rules


# ------------------------------------------------------------------------------------------ schedules


def schedule_checks(n_steps: int = 1000) -> list[CheckResult]:
    out = []
    lr_max = list(GROUP_LR_MAX)
    for pct in (0.25, 0.3, 0.99):
        lr_s, mom_s = schedules.one_cycle(n_steps, lr_max, div=25.0, div_final=1e5, pct_start=pct, moms=MOMS)
        steps = jnp.arange(n_steps)
        got_lr = np.asarray(jax.vmap(lr_s)(steps), np.float64)
        got_mom = np.asarray(jax.vmap(mom_s)(steps), np.float64)
        acc = _Acc()
        for g, lm in enumerate(lr_max):
            ref_lr, ref_mom = ref_sched.one_cycle_values(n_steps, lm, 25.0, 1e5, pct, MOMS)
            for t in range(n_steps):  # relative to each step's own value: the tail is 1e5 x smaller than the peak
                acc.add("lr", got_lr[t, g:g + 1], np.asarray([ref_lr[t]]))
                acc.add("momentum", got_mom[t:t + 1], np.asarray([ref_mom[t]]))
        for q in ("lr", "momentum"):
            out.append(CheckResult(f"one-cycle (fastai combined_cos), pct_start={pct}, {n_steps} steps", q,
                                   acc.abs[q], acc.rel[q], TOL_SCHEDULE, "jaxtl/schedules.py:one_cycle"))

    acc = _Acc()
    for epochs, base_lr, lr_mult in ((1, 2e-3, 100), (5, 1e-3, 10), (3, 3e-3, 1000)):
        got = schedules.fine_tune_plan(epochs, base_lr, 1, lr_mult, 0.3, 5.0)
        want = ref_sched.fine_tune_calls(epochs, base_lr, 1, lr_mult, 0.3, 5.0)
        for ph, call in zip(got, want, strict=True):
            acc.add("lrs", np.asarray(ph.lrs), np.asarray(call["lrs"], np.float64))
            acc.add("pct_start, div", np.asarray([ph.pct_start, ph.div]), np.asarray([call["pct_start"], call["div"]]))
    for q in acc.rel:
        out.append(CheckResult("fine_tune phases (even_mults, slice(hi))", q, acc.abs[q], acc.rel[q], 1e-12,
                               "jaxtl/schedules.py:fine_tune_plan"))

    sweep = schedules.lr_find_schedule(1e-7, 10.0, 100)
    got = np.asarray(jax.vmap(sweep)(jnp.arange(100)), np.float64)
    acc = _Acc()
    for t in range(100):
        acc.add("lr", got[t:t + 1], np.asarray([ref_sched.sched_exp(1e-7, 10.0, t / 100)]))
    out.append(CheckResult("lr_find sweep (SchedExp 1e-7 -> 10)", "lr", acc.abs["lr"], acc.rel["lr"], 1e-5,
                           "jaxtl/schedules.py:lr_find_schedule"))

    rng = np.random.default_rng(0)
    worst, worst_smooth = 0, 0.0
    for trial in range(200):
        n = int(rng.integers(20, 120))
        lrs = np.geomspace(1e-7, 10, n)
        if trial % 2:  # lr_find-like: flat, descending valley, blow-up
            x = np.linspace(0, 1, n)
            losses = 2.3 - 1.5 * np.exp(-((x - 0.6) / 0.2) ** 2) + np.exp(12 * (x - 0.9)) + 0.1 * rng.standard_normal(n)
        else:
            losses = rng.standard_normal(n).cumsum()
        smoother = metrics.SmoothLoss()
        smooth = [smoother.update(float(v)) for v in losses]
        ref_smooth = ref_sched.smooth_losses(list(losses))
        worst_smooth = max(worst_smooth, _rel(np.asarray(smooth), np.asarray(ref_smooth))[1])
        worst = max(worst, abs(schedules.valley(lrs, losses)[1] - ref_sched.valley(list(lrs), list(losses))[1]))
        if n > 20:
            worst = max(worst, abs(schedules.suggest_lr(lrs, smooth, 100)[1]
                                   - ref_sched.lr_find_suggestion(list(lrs), ref_smooth, 100)[1]))
    out.append(CheckResult("lr_find valley rule (200 loss curves)", "index", float(worst), float(worst), 0.0,
                           "jaxtl/schedules.py:valley"))
    out.append(CheckResult("AvgSmoothLoss (beta=0.98)", "smoothed loss", worst_smooth, worst_smooth, 1e-12,
                           "jaxtl/metrics.py:SmoothLoss"))
    return out


def run_all(verbose: Callable[[str], None] | None = None) -> list[CheckResult]:
    results = []
    for rule in optimizer_rules():
        if verbose:
            verbose(rule.name)
        results.extend(run_optimizer_rule(rule))
    results.extend(schedule_checks())
    from jaxtl.reference import ema, regularise  # label smoothing, MixUp, CutMix (jaxtl.mix); jaxtl.ema

    results.extend(CheckResult(*row) for row in regularise.check_rows() + ema.check_rows())
    return results


def format_table(results: Sequence[CheckResult], markdown: bool = False) -> str:
    """Plain-text (or Markdown, for notebooks) table: rule, quantity, max abs diff, max rel diff, tolerance."""
    header = ("rule", "quantity", "max abs diff", "max rel diff", "tolerance", "result", "source")
    rows = [(r.rule, r.quantity, f"{r.max_abs_diff:.2e}", f"{r.max_rel_diff:.2e}", f"{r.tolerance:.1e}",
             "pass" if r.passed else "FAIL", r.source) for r in results]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])
