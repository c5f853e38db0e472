"""The base ConfigDict every ``configs/*.py`` starts from, and its validation.

Every field a user may set is declared here with its default, so that ``--config.x.y=v`` overrides
are type-checked by ml_collections and a misspelled field is rejected with the closest valid names.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable

import ml_collections

# Every list of choices is defined next to what it chooses; validate() imports them (inside the function, so that
# importing this module stays light): data.source / data.on_corrupt in jaxtl.data.sources, model.arch / model.head in
# jaxtl.models, model.kernels in jaxtl.models.kernels, optim.name in jaxtl.optim.transforms, train.recipe (and
# each recipe's fastai defaults) in jaxtl.schedules, train.precision in jaxtl.train, train.parallel in
# jaxtl.parallel, train.metric in jaxtl.metrics, data.augment_device in jaxtl.device_augment.

# data fields that only some sources read (every other data field applies to all of them)
DATA_FIELD_SOURCES: dict[str, tuple[str, ...]] = {
    "path": ("folder", "name_func"),
    "label": ("folder", "name_func", "tfds"),
    "on_corrupt": ("folder", "name_func", "demo"),
    "tfds_name": ("tfds",),
    "data_dir": ("tfds",),
    "download": ("tfds",),
    "tfds_split": ("tfds",),
    "shuffle_buffer": ("tfds",),
    "demo_images": ("demo",),
    "demo_classes": ("demo",),
}

_FITS = ("fine_tune", "one_cycle", "linear_probe")
_IMAGE_STEPS = ("fine_tune", "one_cycle", "lr_find")  # train steps on images (linear_probe: on features)
# train fields that only some recipes read (lr_find: its own sweep, a fresh optimiser state, no epochs or checkpoints;
# linear_probe: the head on features computed once -- no image mixing, the body never trains)
TRAIN_FIELD_RECIPES: dict[str, tuple[str, ...]] = {
    "epochs": _FITS, "lr": _FITS, "pct_start": _FITS, "div": _FITS, "div_final": _FITS, "moms": _FITS,
    "metric": _FITS, "checkpoint": _FITS,
    "accum_steps": _FITS,  # lr_find's sweep sets one lr per batch
    "tta": _FITS,
    "train_bn": _IMAGE_STEPS, "mixup_alpha": _IMAGE_STEPS, "cutmix_alpha": _IMAGE_STEPS, "mix_prob": _IMAGE_STEPS,
    "mix_switch_prob": _IMAGE_STEPS, "mix_off_epoch": _IMAGE_STEPS,
    # one_cycle is one phase: the frozen set never changes within it
    "freeze_epochs": ("fine_tune",), "lr_mult": ("fine_tune",), "reset_opt_on_freeze": ("fine_tune",),
}
_ADAMS = ("adam", "adamw", "lamb", "lamb_fastai")
OPTIM_FIELD_NAMES: dict[str, tuple[str, ...]] = {"b2": _ADAMS, "eps": _ADAMS, "nesterov": ("sgd",)}


# data fields of the training augmentation (RandomResizedCrop + fastai's aug_transforms)
AUGMENT_FIELDS = ("min_scale", "augment", "flip", "max_rotate", "min_zoom", "max_zoom", "max_warp", "max_lighting",
                  "p_affine", "p_lighting")


class ConfigWarning(UserWarning):
    """A config field is set but what the config chose elsewhere does not read it."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults: fastai's ``vision_learner`` + ``fine_tune`` on a ResNet-34."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Each data field applies to every source unless its comment names some (DATA_FIELD_SOURCES; setting a field
    # that the chosen source ignores is a warning, see ignored_fields).
    c.data = d = ml_collections.ConfigDict()
    d.source = "folder"  # folder | name_func | tfds | demo
    d.path = ""  # [folder, name_func] image folder (name_func: or a text file listing images)
    # [folder, name_func, tfds] parent (folder names) | is_cat (file name's first letter upper-case) |
    # regex:<pattern> (group 1 of the file name) | feature:<name> (a TFDS feature, e.g. feature:label);
    # TFDS examples are named by their file_name feature. source=demo is always labelled by folder.
    d.label = "parent"
    # fastai's RandomSplitter(valid_pct, seed) over the items in sorted order. folder: used when there are no
    # train/ + valid/ (or val/) sub-folders; tfds: > 0 pools data.tfds_split and splits it at random, 0 keeps
    # the dataset's own train and validation-or-test splits.
    d.valid_pct = 0.2
    d.seed = 42  # seed of the valid_pct split (fastai's RandomSplitter(seed=42))
    d.size = 224  # square crop side in pixels
    # progressive resizing: ((from_epoch, size), ...) over the run's data epochs, e.g. ((0, 128), (2, 224)); starts
    # at epoch 0 and ends at data.size; () = every epoch at data.size (jaxtl/data/sizes.py)
    d.size_schedule = ()
    d.min_scale = 0.5  # RandomResizedCrop's smallest area fraction
    d.augment = True  # aug_transforms (rotate/zoom/warp/lighting) on the training set
    d.flip = True  # horizontal flips (part of aug_transforms)
    d.max_rotate = 10.0
    d.min_zoom = 1.0
    d.max_zoom = 1.1
    d.max_warp = 0.2
    d.max_lighting = 0.2
    d.p_affine = 0.75
    d.p_lighting = 0.75
    d.mean = (0.485, 0.456, 0.406)  # ImageNet normalisation
    d.std = (0.229, 0.224, 0.225)
    d.on_corrupt = "skip"  # [folder, name_func, demo] unreadable files: skip (warn and drop) | error
    d.tfds_name = "oxford_iiit_pet"  # [tfds]
    d.data_dir = ""  # [tfds] TFDS data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
    d.download = True  # [tfds] let TFDS download + prepare a missing dataset (offline: fails at once, says what)
    d.tfds_split = "train+test"  # [tfds] the splits pooled for a valid_pct > 0 random split
    d.num_workers = -1  # tf.data parallelism (-1 = AUTOTUNE)
    # [tfds] shuffle buffer of the training examples (image files are permuted whole; data.cache shuffles the
    # cached set whole)
    d.shuffle_buffer = 2048
    d.cache = False  # cache decoded images in memory (small datasets)
    # where fastai's batch transforms + normalisation run: device (in the jitted step; uint8 batches) | host
    d.augment_device = "device"
    d.demo_images = 96  # [demo] images per class generated by source=demo
    d.demo_classes = 2  # [demo]

    c.model = m = ml_collections.ConfigDict()
    m.arch = "resnet34"
    m.pretrained = ""  # registry name (resnet34.tv_in1k), a file (.pth/.safetensors), or '' for random init
    m.head = "fastai"  # fastai | linear
    m.head_dropout = 0.5
    m.zero_init_residual = False
    m.weights_dir = ""  # download cache ('' = $JAXTL_CACHE or ~/.cache/jaxtl/weights)
    # jaxtl/models/kernels.py: auto (the CPU kernels when JAX's default backend is the CPU) | plain | cpu
    m.kernels = "auto"

    c.train = t = ml_collections.ConfigDict()
    t.recipe = "fine_tune"  # fine_tune | one_cycle | lr_find | linear_probe (jaxtl/probe.py)
    t.epochs = 1
    t.freeze_epochs = 1
    t.lr = 2e-3  # base_lr (fine_tune) or lr_max (one_cycle)
    t.lr_mult = 100.0
    # -1 = the recipe's fastai default: fine_tune(pct_start=0.3, div=5), fit_one_cycle(pct_start=0.25, div=25)
    t.pct_start = -1.0
    t.div = -1.0
    t.div_final = 1e5
    t.moms = (0.95, 0.85, 0.95)
    t.batch_size = 64  # global batch (all devices, all hosts)
    t.train_bn = True
    t.reset_opt_on_freeze = True  # fastai resets the optimiser when the frozen set changes
    t.precision = "auto"  # auto (bfloat16 compute on GPU/TPU, float32 on CPU) | float32 | bfloat16
    t.parallel = "jit"  # jit | pmap
    t.metric = "error_rate"  # checkpoint-selection metric (lower is better)
    t.checkpoint = True
    t.max_steps = 0  # stop each fit after this many steps (0 = no limit; for smoke tests)
    # label smoothing, MixUp / CutMix in the train step (jaxtl/mix.py; timm Mixup semantics; 0 = off)
    t.label_smoothing = 0.0  # eps of fastai's LabelSmoothingCrossEntropy / optax.smooth_labels
    t.mixup_alpha = 0.0  # MixUp: lambda ~ Beta(alpha, alpha) per batch
    t.cutmix_alpha = 0.0  # CutMix: lambda ~ Beta(alpha, alpha), box from lambda, lambda corrected to the area
    t.mix_prob = 1.0  # probability a batch is mixed
    t.mix_switch_prob = 0.5  # both alphas > 0: probability of CutMix rather than MixUp
    t.mix_off_epoch = 0  # no mixing from this (data) epoch on (0 = mix throughout)
    # moving average of the weights (jaxtl/ema.py; timm ModelEmaV3 semantics, BatchNorm statistics included)
    t.ema_decay = 0.0  # 0 = off; e.g. 0.999 (timm's train.py default 0.9998)
    t.ema_warmup = False  # timm use_warmup: decay min(ema_decay, 1 - (1 + step)^(-2/3))
    t.eval_ema = True  # with EMA on: validate, predict and export the EMA weights
    t.tta = 0  # test-time augmentation after the last epoch: this many augmented passes (0 = off; fastai beta 0.25)
    t.accum_steps = 1  # gradient accumulation: one optimiser step per this many batches (optax.MultiSteps)
    t.sync_every = 0  # steps between host reads of the losses (0 = auto: 1 on CPU, 16 on GPU/TPU)
    t.compile_cache_dir = ""  # JAX persistent compilation cache ('' = ~/.cache/jaxtl/xla)
    t.distributed = False  # call jax.distributed.initialize() (multi-host)

    c.optim = o = ml_collections.ConfigDict()
    o.name = "adam"  # adam (= adamw: decoupled weight decay) | lamb | lamb_fastai | sgd
    o.wd = 0.01
    o.b2 = 0.99
    o.eps = 1e-5
    o.nesterov = False
    return c


def recipe_value(config: ml_collections.ConfigDict, field: str) -> float:
    """``train.pct_start``/``train.div`` with -1 resolved to the recipe's fastai default."""
    from jaxtl.schedules import RECIPES

    value = config.train[field]
    return RECIPES[str(config.train.recipe)].get(field, RECIPES["one_cycle"][field]) if value < 0 else value


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` naming the field and the valid choices for any bad value."""
    def check(field: str, value: str, choices: Iterable[str]) -> None:
        if value not in choices:
            hint = closest(str(value), choices)
            raise ValueError(
                f"config field {field}={value!r} is not valid; choose one of {list(choices)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )

    extra = sorted(set(field_paths(config)) - set(field_paths(base_config())))
    if extra:  # a config file can add attributes to the unlocked ConfigDict; nothing would read them
        valid = field_paths(base_config())
        hints = [f"{f} (did you mean {closest(f, valid)[0]}?)" if closest(f, valid) else f for f in extra]
        raise ValueError(f"config field(s) {', '.join(hints)} do not exist, so nothing would read them; the fields "
                         "are listed in jaxtl/config.py and the README's 'Config fields' table")
    from jaxtl.data.sources import ON_CORRUPT, SOURCES
    from jaxtl.device_augment import AUGMENT_DEVICES
    from jaxtl.metrics import LOWER_IS_BETTER
    from jaxtl.models import ARCHS, HEADS
    from jaxtl.models.kernels import KERNELS
    from jaxtl.optim.transforms import OPTIMIZERS
    from jaxtl.parallel import MODES
    from jaxtl.schedules import RECIPES
    from jaxtl.train import PRECISIONS

    check("data.source", config.data.source, SOURCES)
    check("train.recipe", config.train.recipe, tuple(RECIPES))
    check("optim.name", config.optim.name, tuple(OPTIMIZERS))
    check("train.precision", config.train.precision, tuple(PRECISIONS))
    check("data.augment_device", config.data.augment_device, AUGMENT_DEVICES)
    check("train.parallel", config.train.parallel, MODES)
    check("data.on_corrupt", config.data.on_corrupt, ON_CORRUPT)
    lab = config.data.label
    if not (lab in ("parent", "is_cat") or lab.startswith(("regex:", "feature:"))):
        raise ValueError(f"config field data.label={lab!r} is not valid; use 'parent', 'is_cat', 'regex:<pattern>' "
                         "or 'feature:<name>' (TFDS)")
    check("train.metric", config.train.metric, tuple(LOWER_IS_BETTER))
    if config.train.batch_size < 1:
        raise ValueError(f"config field train.batch_size must be >= 1, got {config.train.batch_size}")
    if not 0.0 <= config.data.valid_pct < 1.0:
        raise ValueError(f"config field data.valid_pct must be in [0, 1), got {config.data.valid_pct}")
    check("model.arch", config.model.arch, tuple(ARCHS))
    check("model.head", config.model.head, HEADS)
    check("model.kernels", config.model.kernels, KERNELS)

    def numbers(field: str, value, n: int) -> None:
        ok = isinstance(value, tuple | list) and len(value) == n and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if not ok:
            example = ",".join(["0.9"] * n)
            raise ValueError(f"config field {field}={value!r} needs {n} numbers, e.g. --config.{field}=({example})")

    numbers("train.moms", config.train.moms, 3)
    numbers("data.mean", config.data.mean, 3)
    numbers("data.std", config.data.std, 3)
    from jaxtl.data.sizes import check_size_schedule

    check_size_schedule(config.data.size_schedule, int(config.data.size))
    for field, value, ok, rule in [
        ("train.lr", config.train.lr, config.train.lr > 0, "> 0"),
        ("train.epochs", config.train.epochs, config.train.epochs >= 0, ">= 0"),
        ("train.freeze_epochs", config.train.freeze_epochs, config.train.freeze_epochs >= 0, ">= 0"),
        ("train.max_steps", config.train.max_steps, config.train.max_steps >= 0, ">= 0 (0 = no limit)"),
        ("train.sync_every", config.train.sync_every, config.train.sync_every >= 0, ">= 0 (0 = auto)"),
        ("train.div_final", config.train.div_final, config.train.div_final > 0, "> 0"),
        ("train.label_smoothing", config.train.label_smoothing, 0 <= config.train.label_smoothing < 1, "in [0, 1)"),
        ("train.mixup_alpha", config.train.mixup_alpha, config.train.mixup_alpha >= 0, ">= 0 (0 = off)"),
        ("train.cutmix_alpha", config.train.cutmix_alpha, config.train.cutmix_alpha >= 0, ">= 0 (0 = off)"),
        ("train.mix_prob", config.train.mix_prob, 0 <= config.train.mix_prob <= 1, "in [0, 1]"),
        ("train.mix_switch_prob", config.train.mix_switch_prob, 0 <= config.train.mix_switch_prob <= 1,
         "in [0, 1]"),
        ("train.mix_off_epoch", config.train.mix_off_epoch, config.train.mix_off_epoch >= 0, ">= 0 (0 = never)"),
        ("train.tta", config.train.tta, config.train.tta >= 0, ">= 0 (0 = off)"),
        ("train.accum_steps", config.train.accum_steps, config.train.accum_steps >= 1, ">= 1 (1 = off)"),
        ("train.ema_decay", config.train.ema_decay, 0 <= config.train.ema_decay < 1, "in [0, 1) (0 = off)"),
        ("data.size", config.data.size, config.data.size >= 1, ">= 1"),
        ("data.std", config.data.std, all(v > 0 for v in config.data.std), "positive"),
        ("data.min_scale", config.data.min_scale, 0 < config.data.min_scale <= 1, "in (0, 1]"),
        ("model.head_dropout", config.model.head_dropout, 0 <= config.model.head_dropout < 1, "in [0, 1)"),
    ]:
        if not ok:
            raise ValueError(f"config field {field} must be {rule}, got {value!r}")
    from jaxtl.data import DataWarning

    for message in ignored_fields(config.data):
        warnings.warn(message, DataWarning, stacklevel=2)
    for message in ignored_run_fields(config):
        warnings.warn(message, ConfigWarning, stacklevel=2)
    if config.data.source in ("folder", "name_func") and not config.data.path:
        raise ValueError(f"config field data.path is empty but data.source={config.data.source!r} needs a folder; "
                         "pass --config.data.path=/path/to/images")


def ignored_run_fields(config: ml_collections.ConfigDict) -> list[str]:
    """A message for each ``train.*`` / ``optim.*`` / ``model.*`` field set away from its default that the chosen
    recipe, optimiser or model settings do not read."""
    default, out = base_config(), []

    def unread(section: str, name: str, why: str) -> None:
        if config[section][name] != default[section][name]:
            out.append(f"config field {section}.{name}={config[section][name]!r} is ignored: {why}")

    recipe, opt = str(config.train.recipe), str(config.optim.name)
    for name, recipes in TRAIN_FIELD_RECIPES.items():
        if recipe not in recipes:
            unread("train", name, f"train.recipe={recipe!r} does not read it (it applies to {', '.join(recipes)})")
    for name, names in OPTIM_FIELD_NAMES.items():
        if opt not in names:
            unread("optim", name, f"optim.name={opt!r} does not read it (it applies to {', '.join(names)})")
    if not config.model.pretrained:
        unread("model", "weights_dir", "model.pretrained is '' (random initialisation): no weights are loaded")
    t = config.train
    if not (t.mixup_alpha > 0 or t.cutmix_alpha > 0):
        for name in ("mix_prob", "mix_switch_prob", "mix_off_epoch"):
            unread("train", name, "train.mixup_alpha and train.cutmix_alpha are 0 (no MixUp / CutMix)")
    elif not (t.mixup_alpha > 0 and t.cutmix_alpha > 0):
        unread("train", "mix_switch_prob", "it chooses between MixUp and CutMix; only one of their alphas is > 0")
    if not t.ema_decay > 0:
        for name in ("ema_warmup", "eval_ema"):
            unread("train", name, "train.ema_decay is 0 (no weight EMA)")
    if config.model.head != "fastai":
        unread("model", "head_dropout", f"model.head={config.model.head!r} has no dropout (only the fastai head)")
    if recipe == "linear_probe":  # the features are computed once, at data.size, with the validation transform
        why = "train.recipe='linear_probe' computes its features once with the validation transform"
        d, dd = config.data, default.data
        unread_data = ["size_schedule"] + ([] if t.tta > 0 else list(AUGMENT_FIELDS))  # train.tta reads them
        out += [f"config field data.{n}={d[n]!r} is ignored: {why}" for n in unread_data if d[n] != dd[n]]
        return out
    n_epochs = {"fine_tune": t.freeze_epochs + t.epochs, "one_cycle": t.epochs}.get(recipe, 1)
    late = [tuple(e) for e in config.data.size_schedule if isinstance(e, tuple | list) and e and e[0] >= n_epochs]
    if late:
        out.append(f"config field data.size_schedule entries {late} are ignored: train.recipe={recipe!r} runs "
                   f"{n_epochs} data epoch(s) (0..{n_epochs - 1})")
    return out


def ignored_fields(data: ml_collections.ConfigDict) -> list[str]:
    """A message for each ``data.*`` field set away from its default that ``data.source`` does not read."""
    source, default = str(data.source), base_config().data
    out = []
    for name, used_by in DATA_FIELD_SOURCES.items():
        if source not in used_by and name in data and data[name] != default[name]:
            out.append(f"config field data.{name}={data[name]!r} is ignored: data.source={source!r} does not "
                       f"read it (it applies to {', '.join(used_by)})")
    return out


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field as a dotted path, e.g. ``train.lr``."""
    out = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(field_paths(value, path + "."))
        else:
            out.append(path)
    return out


def check_override_names(argv: Iterable[str], flag: str = "config") -> None:
    """Reject ``--config.<field>=`` overrides naming no field of :func:`base_config`, with the closest names.

    ml_collections would raise a bare AttributeError traceback; a user gets one line instead.
    """
    valid = field_paths(base_config())
    bad = []
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        name = arg[len(flag) + 3:].split("=", 1)[0]
        if name not in valid:
            hint = closest(name, valid) or closest(name.split(".")[-1], [v.split(".")[-1] for v in valid])
            bad.append(f"--{flag}.{name}" + (f" (did you mean {', '.join(hint)}?)" if hint else ""))
    if bad:
        raise ValueError(
            "unknown config field(s): " + "; ".join(bad)
            + ". Valid fields are listed in jaxtl/config.py and the README's 'Config fields' table."
        )
