"""``build_optimizer``: one optimiser per layer group (discriminative lrs), frozen leaves left alone.

Freezing has one source: the ``trainable`` bool tree (``jaxtl.groups.trainable_mask`` for ``freeze_to(n)`` and
``train_bn``), computed once per phase by the Learner and read both here and by the train step
(``jaxtl.train.make_train_step``). Two layouts, chosen by ``keep_state_structure``:

- ``False`` (fastai: changing the frozen set resets the optimiser): ``optax.partition`` over the labels
  ``"g{k}"`` (layer group ``k``) where ``trainable`` and ``"frozen"`` elsewhere; frozen leaves get
  ``optax.set_to_zero()`` (no update, no decay, no state). The state's structure depends on which leaves are
  frozen, so build a fresh state (``tx.init``) at each phase.
- ``True`` (``train.reset_opt_on_freeze=False``): ``optax.partition`` over the group labels only, and inside each
  group :func:`jaxtl.optim.transforms.freeze_leaves` zeroes the frozen leaves' updates (from the same
  ``trainable`` tree) and keeps their state. This second mechanism stays because a partition's state follows
  its labels: a leaf that moves from ``"frozen"`` to ``"g0"`` would start with empty moments, while this layout's
  state has the same structure for every frozen set, so it carries from one phase to the next (pass it through
  :func:`jaxtl.optim.restart_schedules` so the new phase's schedules start at step 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from jaxtl import groups
from jaxtl.optim.transforms import OPTIMIZERS, MaskOrFn, ScalarOrSchedule


def make_optimizer(
    name: str,
    learning_rate: ScalarOrSchedule,
    momentum: ScalarOrSchedule | None = None,
    *,
    weight_decay: float = 0.01,
    b2: float = 0.99,
    eps: float = 1e-5,
    nesterov: bool = False,
    wd_mask: MaskOrFn | None = None,
    trainable: MaskOrFn | None = None,
) -> optax.GradientTransformation:
    """The optimiser ``name`` (adam | lamb | lamb_fastai | sgd) with config-style arguments.

    ``momentum`` is Adam/LAMB's ``b1`` or SGD's momentum (default 0.9), constant or a schedule.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not known; choose one of {list(OPTIMIZERS)}")
    mom = 0.9 if momentum is None else momentum
    if name == "sgd":
        return OPTIMIZERS[name](learning_rate, momentum=mom, nesterov=nesterov, weight_decay=weight_decay,
                                wd_mask=wd_mask, trainable=trainable)
    return OPTIMIZERS[name](learning_rate, b1=mom, b2=b2, eps=eps, weight_decay=weight_decay, wd_mask=wd_mask,
                            trainable=trainable)


def build_optimizer(
    optim_cfg: Any,
    params: Any,
    group_lrs: Sequence[ScalarOrSchedule],
    momentum_schedule: ScalarOrSchedule | None = None,
    trainable: Any = None,
    keep_state_structure: bool = False,
) -> optax.GradientTransformation:
    """Per-group optimiser for a jaxtl parameter tree (``params`` may be arrays or ``jax.eval_shape`` structs).

    ``optim_cfg`` needs ``name``, ``wd``, ``b2``, ``eps``, ``nesterov`` (the config's ``optim`` section).
    ``group_lrs``: one lr (float or schedule) per layer group, e.g. ``split_schedule(one_cycle(...)[0], 3)``.
    ``trainable``: bools shaped like ``params`` (None = every leaf trains). No weight decay on normalisation
    parameters and biases.
    """
    if len(group_lrs) != groups.N_GROUPS:
        raise ValueError(f"need {groups.N_GROUPS} learning rates (one per layer group), got {len(group_lrs)}")
    group_of = groups.group_labels(params)
    if trainable is None:
        trainable = jax.tree_util.tree_map(lambda _: True, params)

    def opt_for(label: str, mask: Any = None) -> optax.GradientTransformation:
        return make_optimizer(
            optim_cfg.name, group_lrs[int(label[1:])], momentum_schedule, weight_decay=float(optim_cfg.wd),
            b2=float(optim_cfg.b2), eps=float(optim_cfg.eps), nesterov=bool(optim_cfg.nesterov),
            wd_mask=groups.wd_mask, trainable=mask,
        )

    if keep_state_structure:
        # inside group g the partition hands over trees holed with MaskedNode outside g: hole the mask alike
        def holed(g: str) -> Any:
            return jax.tree_util.tree_map(lambda lab, m: m if lab == g else optax.MaskedNode(), group_of, trainable)

        present = sorted(set(jax.tree_util.tree_leaves(group_of)))
        return optax.partition({g: opt_for(g, holed(g)) for g in present}, group_of)

    labels = jax.tree_util.tree_map(lambda lab, m: lab if m else groups.FROZEN, group_of, trainable)
    present = sorted(set(jax.tree_util.tree_leaves(labels)))
    return optax.partition({lab: optax.set_to_zero() if lab == groups.FROZEN else opt_for(lab) for lab in present},
                           labels)
