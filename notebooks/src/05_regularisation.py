# %% [markdown]
# # Regularisation and cheap tricks: label smoothing, MixUp, CutMix, EMA, TTA, a linear probe, progressive resizing
#
# The fine-tuning features researchers reach for after fastai's recipe, each against the same `fine_tune`
# baseline. On a few hundred images, which of them move the error rate beyond seed noise, and what do they cost
# in wall time?
#
# **Variants** (each adds one thing to the baseline; same data, model, optimiser, learning rates and seeds):
# - `baseline`: `fine_tune(E, base_lr=2e-3, freeze_epochs=1)`;
# - `+label smoothing`: `train.label_smoothing=0.1` (fastai's `LabelSmoothingCrossEntropy`);
# - `+MixUp`: `train.mixup_alpha=0.4`; `+CutMix`: `train.cutmix_alpha=1.0` (timm `Mixup`, batch mode);
# - `+EMA`: `train.ema_decay=0.998` with timm's warm-up (`train.ema_warmup`): validation uses the averaged weights
#   (these runs are a few dozen steps, where the warm-up keeps the average close to the recent weights);
# - `+TTA`: `train.tta=4`: the metrics are those of fastai's `Learner.tta(n=4, beta=0.25)` after the last epoch
#   (`error_rate_no_tta` in `runs.csv` is the same model without it);
# - `linear probe`: `train.recipe=linear_probe`, E + 1 epochs at lr 1e-2: the pretrained body's features
#   computed once, only the head trained on them (the fast, honest baseline);
# - `progressive resizing`: `data.size_schedule` at 3/4 of the size for the first half of the data epochs.
#
# `wall_s` is each run's whole wall time (data, compiles, epochs, validation, TTA). The numbers compare
# variants only where the body is pretrained: offline, the real mode's weights fall back to seeded random ones
# (`JAXTL_PRETRAINED=demo:...`), which checks the code path, not transfer.
#
# Mode: `SMALL=1` is a seconds-long smoke test on generated images (the numbers mean nothing); the real mode
# runs `JAXTL_NB_ARCH` (ResNet-34) at `JAXTL_NB_SIZE` (224 px) on `hymenoptera_data` over 3 seeds. Outputs go to
# `JAXTL_NB_OUT`.

# %%
import jax
from IPython.display import Image, Markdown, display

from jaxtl import ablation
from jaxtl.train import enable_compilation_cache

S = ablation.settings("05_regularisation")
base = ablation.base_config(S)
enable_compilation_cache(base.train.compile_cache_dir)  # variants that share a step compile it once
print(ablation.run_note(S, base))
print("jax", jax.__version__, "| output folder:", S.out_dir)

# %%
EPOCHS = 1 if S.small else 3  # unfrozen epochs of fine_tune (+ 1 frozen epoch)
base.train.recipe, base.train.epochs, base.train.freeze_epochs, base.train.lr = "fine_tune", EPOCHS, 1, 2e-3
small_size = max(16, base.data.size * 3 // 4 // 8 * 8)  # 24 px in SMALL mode, 168 at 224
half = (EPOCHS + 1) // 2  # data epochs at the small size

variants = {
    "baseline": {},
    "+label smoothing": {"train.label_smoothing": 0.1},
    "+MixUp": {"train.mixup_alpha": 0.4},
    "+CutMix": {"train.cutmix_alpha": 1.0},
    "+EMA": {"train.ema_decay": 0.998, "train.ema_warmup": True},
    "+TTA": {"train.tta": 4},
    "linear probe": {"train.recipe": "linear_probe", "train.epochs": EPOCHS + 1, "train.lr": 1e-2},
    "progressive resizing": {"data.size_schedule": ((0, small_size), (half, base.data.size))},
}
rows, histories = ablation.run_variants(base, variants, S.seeds, runs_dir=S.out_dir / "runs")

# %%
METRICS = ("error_rate", "valid_loss", "train_loss", "wall_s")
summary = ablation.summarize(rows, METRICS)
title = "regularisation and cheap tricks on top of fine_tune"
paths = ablation.write_results(summary, rows, S.out_dir, METRICS, title=title, note=ablation.run_note(S, base))
display(Markdown(ablation.markdown_table(summary, METRICS)))
plot = ablation.plot_results(summary, S.out_dir / "results.png", ("error_rate", "wall_s"), histories,
                             title=title)
display(Image(filename=str(plot)))
print(*paths.values(), plot, sep="\n")

# %% [markdown]
# **Reading the table.** A variant helps only where its mean error rate differs from the baseline's by more than
# the spread over seeds. The training-loss column is not comparable across MixUp / CutMix / label smoothing (their
# targets are soft); the validation loss is the plain cross-entropy everywhere (with TTA: of the blended
# probabilities). The linear probe trains far fewer parameters for less time: its row says what the frozen
# features alone are worth. Per-epoch histories are in `runs/<variant>/seed<k>/history.csv`.
