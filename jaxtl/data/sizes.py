"""Progressive resizing (fastai book, ch. 7): ``data.size_schedule`` -> the image side of each data epoch.

A schedule is a sequence of ``(from_epoch, size)`` pairs, epochs counted over the whole run (``Learner.data_epoch``:
``fine_tune``'s frozen epochs included), e.g. ``((0, 128), (2, 224))``: 128 px for data epochs 0 and 1, 224 px from
epoch 2 on. Empty: every epoch at ``data.size``. The schedule must start at epoch 0, its epochs must increase, and
its last size must be ``data.size``: the size the model finishes at, which prediction, TTA and export use. An epoch
trains and validates at its size (fastai's book swaps both ``DataLoaders`` when it resizes). No TensorFlow here:
``jaxtl.config`` checks schedules with it.
"""

from __future__ import annotations

from collections.abc import Sequence

Schedule = tuple[tuple[int, int], ...]


def check_size_schedule(schedule: Sequence[Sequence[int]], size: int, field: str = "data.size_schedule") -> Schedule:
    """The schedule as a tuple of int pairs; ``ValueError`` naming ``field`` and the fix when it is malformed."""
    example = f"e.g. --config.{field}='((0, 128), (2, {size}))'"
    pairs = []
    for entry in schedule:
        ok = isinstance(entry, tuple | list) and len(entry) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in entry)
        if not ok:
            raise ValueError(f"config field {field} entry {entry!r} is not an (epoch, size) pair of integers; "
                             f"{example}")
        pairs.append((int(entry[0]), int(entry[1])))
    if not pairs:
        return ()
    if pairs[0][0] != 0:
        raise ValueError(f"config field {field} must start at epoch 0 (it sets the size of every epoch), got "
                         f"{tuple(pairs)}; {example}")
    epochs = [e for e, _ in pairs]
    if any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise ValueError(f"config field {field} needs increasing epochs, got {tuple(pairs)}; {example}")
    if any(s < 2 for _, s in pairs):
        raise ValueError(f"config field {field} sizes must be >= 2 pixels, got {tuple(pairs)}")
    if pairs[-1][1] != size:
        raise ValueError(f"config field {field} ends at size {pairs[-1][1]} but data.size={size}: data.size is the "
                         f"size training finishes at (prediction, TTA and export use it); set "
                         f"--config.data.size={pairs[-1][1]} or end the schedule at {size}")
    return tuple(pairs)


def size_at(schedule: Schedule, epoch: int, size: int) -> int:
    """The image side of data epoch ``epoch``: the last entry starting at or before it (``size`` if none)."""
    out = size
    for start, s in schedule:
        if start <= epoch:
            out = s
    return out


def next_change(schedule: Schedule, epoch: int) -> int | None:
    """The first epoch after ``epoch`` whose size may differ (the next entry's start), or None."""
    return next((start for start, _ in schedule if start > epoch), None)
