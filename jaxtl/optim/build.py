"""``build_optimizer``: one optimiser per layer group (discriminative lrs), frozen groups excluded.

Two layouts, chosen by ``keep_state_structure``:

- ``False`` (fastai: changing the frozen set resets the optimiser): ``optax.partition`` over
  :func:`jaxtl.groups.param_labels`; ``"frozen"`` leaves get ``optax.set_to_zero()`` (no update, no decay, no
  state) and each label ``"g{k}"`` gets the optimiser with group ``k``'s lr schedule. The state's structure
  depends on which leaves are frozen, so build a fresh state (``tx.init``) at each phase.
- ``True`` (``train.reset_opt_on_freeze=False``): partition over the group labels only; inside each group
  :func:`jaxtl.optim.transforms.freeze_leaves` zeroes frozen leaves' updates and keeps their state. The state's
  structure is the same for every ``n_frozen_groups``, so a state can be carried from one phase's optimiser to
  the next; pass it through :func:`jaxtl.optim.restart_schedules` so the new phase's schedules start at step 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    n_frozen_groups: int = 0,
    train_bn: bool = True,
    keep_state_structure: bool = False,
) -> optax.GradientTransformation:
    """Per-group optimiser for a jaxtl parameter tree (``params`` may be arrays or ``jax.eval_shape`` structs).

    ``optim_cfg`` needs ``name``, ``wd``, ``b2``, ``eps``, ``nesterov`` (the config's ``optim`` section).
    ``group_lrs``: one lr (float or schedule) per layer group, e.g. ``split_schedule(one_cycle(...)[0], 3)``.
    ``n_frozen_groups`` follows ``freeze_to(n)`` (-1 = freeze, 0 = unfreeze). No weight decay on normalisation
    parameters and biases; BatchNorm parameters of frozen groups train when ``train_bn``.
    """
    if len(group_lrs) != groups.N_GROUPS:
        raise ValueError(f"need {groups.N_GROUPS} learning rates (one per layer group), got {len(group_lrs)}")
    groups.n_frozen(n_frozen_groups)  # validates

    def opt_for(label: str, trainable: MaskOrFn | None = None) -> optax.GradientTransformation:
        return make_optimizer(
            optim_cfg.name, group_lrs[int(label[1:])], momentum_schedule, weight_decay=float(optim_cfg.wd),
            b2=float(optim_cfg.b2), eps=float(optim_cfg.eps), nesterov=bool(optim_cfg.nesterov),
            wd_mask=groups.wd_mask, trainable=trainable,
        )

    if keep_state_structure:
        present = sorted(set(jax.tree_util.tree_leaves(groups.group_labels(params))))
        trainable: Callable[[Any], Any] = lambda tree: groups.trainable_mask(tree, n_frozen_groups, train_bn)
        return optax.partition({g: opt_for(g, trainable) for g in present}, groups.group_labels)

    label_fn: Callable[[Any], Any] = lambda tree: groups.param_labels(tree, n_frozen_groups, train_bn)
    present = sorted(set(jax.tree_util.tree_leaves(label_fn(params))))
    transforms = {lab: optax.set_to_zero() if lab == groups.FROZEN else opt_for(lab) for lab in present}
    return optax.partition(transforms, label_fn)
