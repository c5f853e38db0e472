"""The 2-process test's run: a random-init ResNet-18 at 32 px on a folder of 24 training images, one class per
image (so a batch's labels name the images it holds), global batch 8, two one-cycle epochs of 3 steps."""

from jaxtl.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.data.source = "folder"
    c.data.path = ""  # --config.data.path=<folder made by tests/distributed/worker.py make_dataset>
    c.data.size = 32
    c.data.num_workers = 1
    c.model.arch = "resnet18"
    c.model.pretrained = ""
    c.model.head = "fastai"  # BatchNorm + dropout in the head: global batch moments and dropout masks matter
    c.train.recipe = "one_cycle"
    c.train.epochs = 2
    c.train.lr = 1e-3
    c.train.batch_size = 8  # global: 4 per process with 2 processes
    return c
