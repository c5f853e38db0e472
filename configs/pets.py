"""The seed experiment: Oxford-IIIT Pet, cats vs dogs, ResNet-34 from ImageNet weights, fine_tune(1).

fastai equivalent::

    dls = ImageDataLoaders.from_name_func(path, get_image_files(path), valid_pct=0.2, seed=42,
        label_func=is_cat, item_tfms=RandomResizedCrop(224, min_scale=0.5), batch_tfms=aug_transforms())
    learn = vision_learner(dls, resnet34, metrics=error_rate)
    learn.fine_tune(1)

Variants: ``--config=configs/pets.py:breeds`` for the 37-breed task (regex labels).
Needs the TFDS ``oxford_iiit_pet`` data and the torchvision ResNet-34 weights (downloaded once).
"""

from jaxtl.config import base_config


def get_config(variant: str = "cats"):
    c = base_config()
    c.data.source = "tfds"
    c.data.tfds_name = "oxford_iiit_pet"
    c.data.label = "is_cat" if variant == "cats" else r"regex:^(.+)_\d+\.jpg$"
    c.data.valid_pct = 0.2
    c.data.seed = 42
    c.data.size = 224
    c.data.min_scale = 0.5
    c.model.arch = "resnet34"
    c.model.pretrained = "resnet34.tv_in1k"
    c.model.head = "fastai"
    c.train.recipe = "fine_tune"
    c.train.epochs = 1
    c.train.freeze_epochs = 1
    c.train.lr = 2e-3
    c.train.batch_size = 64
    return c
