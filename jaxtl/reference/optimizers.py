"""Plain NumPy (float64) transcriptions of the optimiser equations, written from the papers / fastai's source.

Used only by the checks (``jaxtl.reference.checks``, ``scripts/check_formulas.py``, tests); nothing here is
imported by jaxtl's training code, and nothing here imports jaxtl. Parameters are flat dicts
``{path: array}``; every optimiser keeps per-parameter state (as PyTorch does) and skips the parameters
listed in ``frozen`` (no gradient: no step, no decay, state untouched). Each ``param_step`` returns the
update ``delta`` (``p_new = p + delta``, written out term by term rather than as a difference of parameters so
that tiny late-schedule updates are not lost to cancellation); ``step`` returns ``(new_params, updates)``.

Per-step hyperparameters are passed to ``step``: ``lr[path]`` (the step's learning rate for that
parameter's group) and ``beta1``/``mom`` (the step's momentum, possibly scheduled).

Sources (equation numbers in docs/formulas.md):
- Adam: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, Algorithm 1.
- AdamW: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, Algorithm 2 (Adam branch).
- LAMB: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020,
  Algorithm 2.
- SGD with momentum / Nesterov: Sutskever et al. 2013 in the form PyTorch documents for ``torch.optim.SGD``.
- fastai: ``fastai/optimizer.py`` (``weight_decay``, ``average_grad``, ``average_sqr_grad``, ``step_stat``,
  ``debias``, ``adam_step``, ``lamb_step``), transcribed callback by callback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

Tree = dict[str, np.ndarray]


def _f64(tree: Mapping[str, np.ndarray]) -> Tree:
    return {k: np.asarray(v, np.float64).copy() for k, v in tree.items()}


class _Ref:
    """Per-parameter state dict and the frozen / weight-decay bookkeeping shared by the transcriptions."""

    momentum_name = "mom"  # keyword under which ``step`` takes the step's momentum / beta1

    def __init__(self, frozen: Iterable[str] = (), no_decay: Iterable[str] = ()) -> None:
        self.frozen = set(frozen)
        self.no_decay = set(no_decay)
        self.state: dict[str, dict[str, np.ndarray | int]] = {}

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: Mapping[str, float],
             **hyper: float) -> tuple[Tree, Tree]:
        old = _f64(params)
        updates = {k: np.zeros_like(v) for k, v in old.items()}
        for k, p in old.items():
            if k in self.frozen:
                continue
            st = self.state.setdefault(k, {})
            updates[k] = self.param_step(p, np.asarray(grads[k], np.float64), st, float(lr[k]),
                                         0.0 if k in self.no_decay else None, **hyper)
        return {k: old[k] + updates[k] for k in old}, updates

    def param_step(self, p: np.ndarray, g: np.ndarray, st: dict, lr: float, wd_override: float | None,
                   **hyper: float) -> np.ndarray:
        raise NotImplementedError


class AdamW(_Ref):
    """Kingma & Ba Alg. 1 with Loshchilov & Hutter's decoupled decay (Alg. 2), in the paper's symbols.

        t <- t + 1
        m_t = b1 m_{t-1} + (1 - b1) g_t                      v_t = b2 v_{t-1} + (1 - b2) g_t^2
        m^_t = m_t / (1 - b1^t)                              v^_t = v_t / (1 - b2^t)
        theta_t = theta_{t-1} - eta_t (alpha m^_t / (sqrt(v^_t) + eps) + lambda theta_{t-1})

    ``alpha`` is the base step size, ``eta_t`` the schedule multiplier, ``lam`` the decay rate.
    With a scheduled b1 (one-cycle momentum), ``b1`` is the step's value and the bias correction uses
    ``b1_t ** t`` (fastai's ``debias`` convention; the paper has a constant b1).
    ``eps_inside_sqrt`` exists only to show that a wrong transcription makes the check fail.
    """

    momentum_name = "b1"

    def __init__(self, alpha: float, b2: float, eps: float, lam: float, frozen: Iterable[str] = (),
                 no_decay: Iterable[str] = (), eps_inside_sqrt: bool = False) -> None:
        super().__init__(frozen, no_decay)
        self.alpha, self.b2, self.eps, self.lam = alpha, b2, eps, lam
        self.eps_inside_sqrt = eps_inside_sqrt

    def param_step(self, p, g, st, lr, wd_override, *, b1: float) -> np.ndarray:  # type: ignore[override]
        eta = lr / self.alpha  # lr = eta_t * alpha
        lam = self.lam if wd_override is None else wd_override
        t = st["t"] = st.get("t", 0) + 1
        m = st["m"] = b1 * st.get("m", np.zeros_like(p)) + (1 - b1) * g
        v = st["v"] = self.b2 * st.get("v", np.zeros_like(p)) + (1 - self.b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - self.b2**t)
        denom = np.sqrt(v_hat + self.eps) if self.eps_inside_sqrt else np.sqrt(v_hat) + self.eps
        return -eta * (self.alpha * m_hat / denom + lam * p)


class FastaiAdam(_Ref):
    """fastai's ``Adam`` (decouple_wd=True), callback by callback as ``Optimizer.step`` runs them::

        weight_decay:      p <- p * (1 - lr*wd)                       (if do_wd and wd != 0)
        average_grad:      grad_avg <- mom*grad_avg + (1-mom)*g        (dampening=True)
        average_sqr_grad:  sqr_avg  <- sqr_mom*sqr_avg + (1-sqr_mom)*g^2
        step_stat:         step <- step + 1
        adam_step:         debias(mom, damp, step) = damp * (1 - mom**step) / (1 - mom)
                           p <- p - lr/debias1 * grad_avg / (sqrt(sqr_avg/debias2) + eps)
    """

    def __init__(self, sqr_mom: float = 0.99, eps: float = 1e-5, wd: float = 0.01, frozen: Iterable[str] = (),
                 no_decay: Iterable[str] = ()) -> None:
        super().__init__(frozen, no_decay)
        self.sqr_mom, self.eps, self.wd = sqr_mom, eps, wd

    @staticmethod
    def debias(mom: float, damp: float, step: int) -> float:
        return damp * (1 - mom**step) / (1 - mom)

    def param_step(self, p, g, st, lr, wd_override, *, mom: float) -> np.ndarray:  # type: ignore[override]
        wd = self.wd if wd_override is None else wd_override
        delta = -lr * wd * p if wd != 0 else np.zeros_like(p)  # p <- p * (1 - lr*wd)
        st["grad_avg"] = st.get("grad_avg", np.zeros_like(g)) * mom + (1 - mom) * g
        st["sqr_avg"] = st.get("sqr_avg", np.zeros_like(g)) * self.sqr_mom + (1 - self.sqr_mom) * g * g
        st["step"] = st.get("step", 0) + 1
        debias1 = self.debias(mom, 1 - mom, st["step"])
        debias2 = self.debias(self.sqr_mom, 1 - self.sqr_mom, st["step"])
        return delta - lr / debias1 * st["grad_avg"] / (np.sqrt(st["sqr_avg"] / debias2) + self.eps)


class Lamb(_Ref):
    """You et al. 2020, Algorithm 2 (LAMB), per layer (= per parameter tensor) i, phi = identity::

        m_t = b1 m_{t-1} + (1 - b1) g_t ;  v_t = b2 v_{t-1} + (1 - b2) g_t^2
        m^_t = m_t / (1 - b1^t) ;  v^_t = v_t / (1 - b2^t)
        r_t = m^_t / (sqrt(v^_t) + eps)
        x_{t+1}^(i) = x_t^(i) - eta_t * phi(||x_t^(i)||) / ||r_t^(i) + lambda x_t^(i)|| * (r_t^(i) + lambda x_t^(i))

    The paper leaves 0/0 undefined; the ratio is taken as 1 when ||x|| = 0 or ||r + lambda x|| = 0 (so a
    zero-initialised layer still moves, and a layer with nothing to do stays put).
    ``exclude_decay_from_norm`` (fastai's choice) exists only to show the check tells the variants apart.
    """

    momentum_name = "b1"

    def __init__(self, b2: float, eps: float, lam: float, frozen: Iterable[str] = (), no_decay: Iterable[str] = (),
                 exclude_decay_from_norm: bool = False) -> None:
        super().__init__(frozen, no_decay)
        self.b2, self.eps, self.lam = b2, eps, lam
        self.exclude_decay_from_norm = exclude_decay_from_norm

    def param_step(self, p, g, st, lr, wd_override, *, b1: float) -> np.ndarray:  # type: ignore[override]
        lam = self.lam if wd_override is None else wd_override
        t = st["t"] = st.get("t", 0) + 1
        m = st["m"] = b1 * st.get("m", np.zeros_like(p)) + (1 - b1) * g
        v = st["v"] = self.b2 * st.get("v", np.zeros_like(p)) + (1 - self.b2) * g * g
        r = (m / (1 - b1**t)) / (np.sqrt(v / (1 - self.b2**t)) + self.eps)
        u = r + lam * p
        x_norm = math.sqrt(float(np.sum(p * p)))
        u_norm = math.sqrt(float(np.sum((r if self.exclude_decay_from_norm else u) ** 2)))
        ratio = 1.0 if x_norm == 0 or u_norm == 0 else x_norm / u_norm
        return -lr * ratio * u


class FastaiLamb(_Ref):
    """fastai's ``Lamb``: ``weight_decay``, ``average_grad`` (dampened), ``average_sqr_grad``, ``step_stat``, then::

        lamb_step: r1 = sqrt(mean(p^2))                       (p already decayed)
                   step = (grad_avg/debias1) / (sqrt(sqr_avg/debias2) + eps)
                   r2 = sqrt(mean(step^2))
                   q = 1 if r1 == 0 or r2 == 0 else min(r1/r2, 10)
                   p <- p - lr * q * step
    """

    def __init__(self, sqr_mom: float = 0.99, eps: float = 1e-5, wd: float = 0.0, frozen: Iterable[str] = (),
                 no_decay: Iterable[str] = ()) -> None:
        super().__init__(frozen, no_decay)
        self.sqr_mom, self.eps, self.wd = sqr_mom, eps, wd

    def param_step(self, p, g, st, lr, wd_override, *, mom: float) -> np.ndarray:  # type: ignore[override]
        wd = self.wd if wd_override is None else wd_override
        delta = -lr * wd * p if wd != 0 else np.zeros_like(p)  # p <- p * (1 - lr*wd)
        p = p + delta
        st["grad_avg"] = st.get("grad_avg", np.zeros_like(g)) * mom + (1 - mom) * g
        st["sqr_avg"] = st.get("sqr_avg", np.zeros_like(g)) * self.sqr_mom + (1 - self.sqr_mom) * g * g
        st["step"] = st.get("step", 0) + 1
        debias1 = FastaiAdam.debias(mom, 1 - mom, st["step"])
        debias2 = FastaiAdam.debias(self.sqr_mom, 1 - self.sqr_mom, st["step"])
        r1 = math.sqrt(float(np.mean(p * p)))
        step = (st["grad_avg"] / debias1) / (np.sqrt(st["sqr_avg"] / debias2) + self.eps)
        r2 = math.sqrt(float(np.mean(step * step)))
        q = 1.0 if r1 == 0 or r2 == 0 else min(r1 / r2, 10.0)
        return delta - lr * q * step


class SGD(_Ref):
    """SGD with momentum (PyTorch's documented form of Sutskever et al. 2013) and decoupled weight decay::

        b_t = mu b_{t-1} + g_t                   (b_0 = 0, so b_1 = g_1)
        d_t = g_t + mu b_t   (Nesterov)   or   d_t = b_t
        p_t = p_{t-1} - lr wd p_{t-1} - lr d_t   (fastai: p <- p (1 - lr wd), then p <- p - lr b)
    """

    def __init__(self, nesterov: bool = False, wd: float = 0.0, frozen: Iterable[str] = (),
                 no_decay: Iterable[str] = ()) -> None:
        super().__init__(frozen, no_decay)
        self.nesterov, self.wd = nesterov, wd

    def param_step(self, p, g, st, lr, wd_override, *, mom: float) -> np.ndarray:  # type: ignore[override]
        wd = self.wd if wd_override is None else wd_override
        b = st["b"] = mom * st.get("b", np.zeros_like(g)) + g
        d = g + mom * b if self.nesterov else b
        return -lr * wd * p - lr * d
