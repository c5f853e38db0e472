"""Forward parity of jaxtl's ResNets with a torchvision-layout torch ResNet, through the .pth converter.

Tolerance: max |jaxtl - torch| / max |torch| <= 1e-4 in float32 (eval logits, train logits, and every
updated BatchNorm running statistic). The inputs are NCHW for torch, NHWC for jaxtl.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_resnet import randomised_resnet

from jaxtl.convert import load_torchvision, variables_to_state_dict
from jaxtl.models import count_params, create_model

RTOL = 1e-4


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


# float32 everywhere (no TF32/bf16 passes for convs on accelerators); a no-op on CPU.
@jax.default_matmul_precision("highest")
@pytest.mark.parametrize(("arch", "size"), [("resnet18", 64), ("resnet18", 57), ("resnet34", 64), ("resnet50", 64)])
def test_forward_parity_with_torch(tmp_path, arch, size):
    torch_model = randomised_resnet(arch, num_classes=10, seed=3)
    path = tmp_path / f"{arch}.pth"
    torch.save(torch_model.state_dict(), path)
    variables = load_torchvision(str(path), arch)
    model = create_model(arch, 10, head="linear")

    x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))

    torch_model.eval()
    with torch.no_grad():
        ref_eval = torch_model(torch.from_numpy(x)).numpy()
    out_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, xj)
    assert out_eval.shape == ref_eval.shape == (2, 10)
    assert _rel(out_eval, ref_eval) <= RTOL

    torch_model.train()
    with torch.no_grad():
        ref_train = torch_model(torch.from_numpy(x)).numpy()
    out_train, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, xj)
    assert _rel(out_train, ref_train) <= RTOL
    # Train mode must differ from eval mode, or the stats comparison below would prove nothing.
    assert _rel(out_train, ref_eval) > 1e-2

    new_sd = variables_to_state_dict({"params": variables["params"], "batch_stats": updates["batch_stats"]}, arch)
    ref_sd = torch_model.state_dict()
    loaded_sd = variables_to_state_dict(variables, arch)
    stats = [k for k in ref_sd if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * sum(1 for m in torch_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for k in stats:
        ref = ref_sd[k].numpy()
        assert _rel(new_sd[k], ref) <= RTOL, k
        # ... and the statistics really moved away from the loaded ones.
        assert not np.allclose(new_sd[k], loaded_sd[k])


def test_resnet34_fastai_head_parameter_count():
    model = create_model("resnet34", 2, head="fastai")
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    # fastai's summary of vision_learner(dls, resnet34) for 2 classes.
    assert count_params(shapes["params"]) == 21_813_056


def test_torchvision_parameter_counts_match_published():
    # torchvision's published num_params for the ImageNet models (1000-class fc).
    published = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
    for arch, n in published.items():
        model = create_model(arch, 1000, head="linear")
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
        assert count_params(shapes["params"]) == n, arch
