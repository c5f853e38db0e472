"""Shared fixtures for the converter tests: a random torchvision-layout ResNet-18 saved as .pth."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The torch reference ResNet lives next to the model parity tests.
_models = str(Path(__file__).resolve().parents[1] / "models")
if _models not in sys.path:
    sys.path.insert(0, _models)


@pytest.fixture(scope="session")
def resnet18_torch():
    from torch_resnet import randomised_resnet

    return randomised_resnet("resnet18", num_classes=5, seed=11).eval()


@pytest.fixture(scope="session")
def resnet18_pth(tmp_path_factory, resnet18_torch):
    import torch

    path = tmp_path_factory.mktemp("weights") / "resnet18-test.pth"
    torch.save(resnet18_torch.state_dict(), path)
    return path
