"""``jaxtl.report``: the validation images gathered for the top-losses plot keep the pipeline's dtype (uint8 when
the batch transforms run on the device), so ``data.denormalize`` shows them as they are, on one or several
processes (several simulated: 2 processes, this one process 0, the other's rows made up)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxtl import parallel, report


class Valid:
    """4 validation images of 2x2 pixels, one batch of 4 + one padded batch (this process's share)."""

    size = 2

    def __init__(self, on_device: bool) -> None:
        self.on_device = on_device
        rs = np.random.RandomState(0)
        u8 = rs.randint(0, 256, (5, 2, 2, 3)).astype(np.uint8)
        self.images = u8 if on_device else (u8 / 255.0 - 0.5).astype(np.float32) / 0.25

    def valid_batches(self):
        pad = np.zeros((3, 2, 2, 3), self.images.dtype)
        yield {"image": self.images[:4], "mask": np.ones(4, bool)}
        yield {"image": np.concatenate([self.images[4:], pad]), "mask": np.array([True, False, False, False])}

    def denormalize(self, x):
        x = np.asarray(x)
        return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x * 0.25 + 0.5


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("processes", [1, 2])
def test_gathered_valid_images_keep_the_pipeline_dtype(monkeypatch, on_device, processes):
    data = Valid(on_device)
    theirs = []
    if processes == 2:
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda: 0)

        def allgather(x):
            assert x.dtype == data.images.dtype
            other = x[::-1].copy()  # the other process's rows (valid images, in another order)
            theirs.append(other)
            return np.stack([x, other])

        monkeypatch.setattr(parallel, "allgather", allgather)
    indices = [0, 1, 4, 6] if processes == 2 else [0, 3, 4]
    got = report.gather_valid_images(data, indices)
    assert sorted(got) == indices
    for k, j in enumerate(indices):
        assert got[j].dtype == data.images.dtype
        if processes == 1 or j % 2 == 0:  # held here: global j = local j // 2 on process 0
            np.testing.assert_array_equal(got[j], data.images[j // processes])
        else:
            np.testing.assert_array_equal(got[j], theirs[0][k])
        shown = data.denormalize(got[j])
        assert shown.dtype == np.float32 and 0 <= shown.min() and shown.max() <= 1 + 1e-6
