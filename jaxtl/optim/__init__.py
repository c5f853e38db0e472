"""Optimisers (optax ``GradientTransformation`` factories) and the per-group optimiser builder.

Equations, symbols <-> config names and the matching NumPy checks: docs/formulas.md.
"""

from jaxtl.optim.build import build_optimizer, make_optimizer
from jaxtl.optim.transforms import (
    LAMB_FASTAI_MAX_RATIO,
    OPTIMIZERS,
    adam,
    freeze_leaves,
    lamb,
    lamb_fastai,
    restart_schedules,
    scale_by_decayed_trust_ratio,
    sgd,
)

__all__ = [
    "LAMB_FASTAI_MAX_RATIO", "OPTIMIZERS", "adam", "build_optimizer", "freeze_leaves", "lamb", "lamb_fastai",
    "make_optimizer", "restart_schedules", "scale_by_decayed_trust_ratio", "sgd",
]
