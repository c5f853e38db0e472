"""The README's main job: the pets.py code path on data and weights jaxtl makes itself (no download).

- data: ``source=demo`` writes a small synthetic two-class JPEG folder into the cache once and reads it
  through the same folder/decode/augment pipeline as real photos;
- weights: ``pretrained=demo:resnet18`` writes a seeded-initialised ResNet-18 in torchvision's format
  once and loads it through the same conversion path as ``resnet34.tv_in1k``;
- recipe: ``fine_tune`` (frozen epoch, then unfrozen epochs with discriminative learning rates).

Small enough to finish in a few minutes on 2 CPU cores.
"""

from jaxtl.config import base_config


def get_config():
    c = base_config()
    c.data.source = "demo"
    c.data.demo_classes = 2
    c.data.demo_images = 64
    c.data.valid_pct = 0.25
    c.data.size = 64
    c.data.min_scale = 0.5
    c.model.arch = "resnet18"
    c.model.pretrained = "demo:resnet18"
    c.train.recipe = "fine_tune"
    c.train.epochs = 3
    c.train.freeze_epochs = 1
    c.train.lr = 2e-3
    c.train.batch_size = 16
    return c
