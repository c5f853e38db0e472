"""Ants vs bees (the PyTorch transfer-learning tutorial's data): a folder with train/ and val/.

``data.path`` defaults to this repository's development copy (``../shared/data/hymenoptera_data``);
point it elsewhere with ``--config.data.path=/path/to/hymenoptera_data``.
"""

from pathlib import Path

from jaxtl.config import base_config

DEFAULT_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera_data"


def get_config():
    c = base_config()
    c.data.source = "folder"
    c.data.path = str(DEFAULT_PATH)
    c.data.label = "parent"
    c.data.size = 224
    c.data.min_scale = 0.5
    c.model.arch = "resnet34"
    c.model.pretrained = "resnet34.tv_in1k"
    c.train.recipe = "fine_tune"
    c.train.epochs = 2
    c.train.batch_size = 32
    return c
