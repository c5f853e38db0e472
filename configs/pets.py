"""The seed experiment: Oxford-IIIT Pet, cats vs dogs, ResNet-34 from ImageNet weights, fine_tune(1).

    python -m jaxtl.main --config configs/pets.py            # 2 classes (is_cat)
    python -m jaxtl.main --config configs/pets.py:breeds     # the 37 breeds (fastai book ch. 5 regex)

Expected (fastai book ch. 1, same task and split rule): error_rate about 0.7% after the frozen epoch and
about 0.4% after fine_tune(1).

fastai equivalent (the same validation files: jaxtl orders the examples by file name, so pass fastai the
sorted file list)::

    files = sorted(get_image_files(path/"images"))   # TFDS's 7,349 Pets images (fastai's folder has 7,390)
    dls = ImageDataLoaders.from_name_func(path, files, valid_pct=0.2, seed=42, label_func=is_cat,
        item_tfms=RandomResizedCrop(224, min_scale=0.5), batch_tfms=aug_transforms())
    learn = vision_learner(dls, resnet34, metrics=error_rate)
    learn.fine_tune(1)

Data: TFDS ``oxford_iiit_pet``; its ``train`` and ``test`` splits are pooled (``data.tfds_split``) and split
20% at random by fastai's ``RandomSplitter(0.2, seed=42)``; the labels come from each example's ``file_name``.
``--config.data.valid_pct=0`` uses TFDS's own train/test splits instead. Needs the TFDS data and the torchvision
ResNet-34 weights (downloaded once; offline it stops at once and says what to fetch).
"""

from jaxtl.config import base_config

BREEDS = r"regex:^(.+)_\d+\.jpg$"  # fastai book ch. 5: using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name')


def get_config(variant: str = "cats"):
    if variant not in ("cats", "breeds"):
        raise ValueError(f"configs/pets.py has the variants 'cats' (default) and 'breeds', not {variant!r}")
    c = base_config()
    c.data.source = "tfds"
    c.data.tfds_name = "oxford_iiit_pet"
    c.data.tfds_split = "train+test"
    c.data.label = "is_cat" if variant == "cats" else BREEDS
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
