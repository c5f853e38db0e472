# %% [markdown]
# # Freezing: how many frozen epochs, and should BatchNorm train while frozen?
#
# `fine_tune` first trains the new head with the pretrained body frozen. Two choices in that phase are usually
# taken on faith:
# - **`freeze_epochs`** — fastai's default is 1. Zero skips the frozen phase (the random head's gradients reach
#   the body at once); two give the head longer to settle.
# - **`train_bn`** — fastai keeps every BatchNorm layer's scale and bias trainable even in frozen layer groups
#   (and the running statistics always update in training mode), on the argument that the normalisation must
#   adapt to the new data's statistics. Off freezes them with the rest of the body.
#
# **Held fixed:** the total number of epochs (frozen + unfrozen), so that a longer frozen phase is paid for with a
# shorter unfrozen one; data, model, optimiser (fastai's Adam), learning rates, seeds. With `freeze_epochs=0`
# there is no frozen phase, so `train_bn` has nothing to act on and runs only once.
#
# Mode: `SMALL=1` is a seconds-long smoke test on generated images (the numbers mean nothing); the real mode
# runs ResNet-34 on `hymenoptera_data` over 3 seeds. Outputs go to `JAXTL_NB_OUT`.

# %%
import jax
from IPython.display import Image, Markdown, display

from jaxtl import ablation
from jaxtl.train import enable_compilation_cache

S = ablation.settings("03_freezing")
base = ablation.base_config(S)
enable_compilation_cache(base.train.compile_cache_dir)  # variants that share a step compile it once
print(ablation.run_note(S, base))
print("jax", jax.__version__, "| output folder:", S.out_dir)

# %%
TOTAL_EPOCHS = 2 if S.small else 5  # frozen + unfrozen (SMALL: "freeze 2" is then fine_tune(0, freeze_epochs=2))
base.train.recipe = "fine_tune"
base.train.lr = 2e-3

variants = {}
for freeze_epochs in (0, 1, 2):
    for train_bn in (True, False):
        if freeze_epochs == 0 and not train_bn:
            continue  # no frozen phase: train_bn changes nothing
        name = f"freeze {freeze_epochs}" + ("" if freeze_epochs == 0 else f", train_bn {'on' if train_bn else 'off'}")
        variants[name] = {"train.freeze_epochs": freeze_epochs, "train.epochs": TOTAL_EPOCHS - freeze_epochs,
                          "train.train_bn": train_bn}
rows, histories = ablation.run_variants(base, variants, S.seeds, runs_dir=S.out_dir / "runs")

# %%
METRICS = ("error_rate", "valid_loss", "train_loss")
summary = ablation.summarize(rows, METRICS)
title = "freeze_epochs and train_bn (fixed total epochs)"
paths = ablation.write_results(summary, rows, S.out_dir, METRICS, title=title, note=ablation.run_note(S, base))
display(Markdown(ablation.markdown_table(summary, METRICS)))
plot = ablation.plot_results(summary, S.out_dir / "results.png", ("error_rate", "valid_loss"), histories,
                             title=title)
display(Image(filename=str(plot)))
print(*paths.values(), plot, sep="\n")

# %% [markdown]
# **Reading the table.** Compare along the rows with the same `train_bn` to see the effect of the frozen phase's
# length, and the on/off pairs at the same `freeze_epochs` for BatchNorm. The curve panel shows whether a
# variant differs only early (the frozen phase) or still at the end. Means ± sample std over seeds; per-epoch
# histories are in `runs/<variant>/seed<k>/history.csv`.
