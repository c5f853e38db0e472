# %% [markdown]
# # Recipes: `fine_tune` vs one-cycle on the whole network vs training from scratch
#
# fastai's `fine_tune` has two ingredients on top of "train a pretrained network": a **frozen phase** (one
# epoch training only the new head and the BatchNorm layers, so the random head does not send large gradients
# into the pretrained body) and **discriminative learning rates** in the unfrozen phase (the first layer group
# at 1/100 of the head's lr). How much do they buy over simply unfreezing everything and running one
# one-cycle schedule with one learning rate, as a plain PyTorch script would? And how much does ImageNet
# pretraining buy at all on a few hundred images?
#
# **Variants** (same total number of epochs, same data, model, optimiser and seeds):
# - `fine_tune`: `fine_tune(E, base_lr=2e-3, freeze_epochs=1)` — 1 frozen epoch, then E unfrozen epochs with
#   lrs `slice(1e-3/100, 1e-3)`;
# - `one_cycle, unfrozen`: `unfreeze(); fit_one_cycle(E + 1, 1e-3)` — every layer at the unfrozen phase's top lr;
# - `from scratch`: the same one-cycle run from a random initialisation (`model.pretrained=""`). Training from
#   scratch would want a larger learning rate and many more epochs; here it is the "no transfer" reference at the
#   same budget, not a tuned scratch baseline.
#
# Mode: `SMALL=1` is a seconds-long smoke test on generated images (the numbers mean nothing); the real mode
# runs ResNet-34 on `hymenoptera_data` over 3 seeds. Outputs go to `JAXTL_NB_OUT`.

# %%
import jax
from IPython.display import Image, Markdown, display

from jaxtl import ablation
from jaxtl.train import enable_compilation_cache

S = ablation.settings("02_recipes")
base = ablation.base_config(S)
enable_compilation_cache(base.train.compile_cache_dir)  # variants that share a step compile it once
print(ablation.run_note(S, base))
print("jax", jax.__version__, "| output folder:", S.out_dir)

# %%
EPOCHS = 1 if S.small else 4  # unfrozen epochs of fine_tune; the one-cycle runs get EPOCHS + 1
BASE_LR = 2e-3
base.train.lr = BASE_LR

variants = {
    "fine_tune": ablation.Variant({"train.recipe": "fine_tune", "train.epochs": EPOCHS, "train.freeze_epochs": 1}),
    "one_cycle, unfrozen": ablation.Variant(
        {"train.recipe": "one_cycle", "train.epochs": EPOCHS + 1, "train.lr": BASE_LR / 2},
        fit=ablation.unfreeze_then_recipe),
    "from scratch": ablation.Variant(
        {"train.recipe": "one_cycle", "train.epochs": EPOCHS + 1, "train.lr": BASE_LR / 2, "model.pretrained": ""},
        fit=ablation.unfreeze_then_recipe),
}
rows, histories = ablation.run_variants(base, variants, S.seeds, runs_dir=S.out_dir / "runs")

# %%
METRICS = ("error_rate", "valid_loss", "train_loss")
summary = ablation.summarize(rows, METRICS)
title = "fine_tune vs one-cycle unfrozen vs from scratch"
paths = ablation.write_results(summary, rows, S.out_dir, METRICS, title=title, note=ablation.run_note(S, base))
display(Markdown(ablation.markdown_table(summary, METRICS)))
plot = ablation.plot_results(summary, S.out_dir / "results.png", ("error_rate", "valid_loss"), histories,
                             title=title)
display(Image(filename=str(plot)))
print(*paths.values(), plot, sep="\n")

# %% [markdown]
# **Reading the table.** The gap between `from scratch` and the two pretrained runs is what transfer buys at this
# budget; the gap between `fine_tune` and `one_cycle, unfrozen` is what the frozen phase plus discriminative lrs
# buy. The per-epoch curve shows *when* the difference appears: a frozen first epoch typically starts lower
# because the body is left intact while the head is still random. Means ± sample std over seeds; per-epoch
# histories are in `runs/<variant>/seed<k>/history.csv`.
