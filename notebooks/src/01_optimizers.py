# %% [markdown]
# # Which optimiser for fine-tuning? AdamW vs LAMB vs SGD
#
# fastai fine-tunes with Adam and decoupled weight decay (AdamW, β = (0.9, 0.99), ε = 1e-5). LAMB (You et al.
# 2020) rescales each layer's Adam step by the trust ratio ‖w‖ / ‖r + λw‖, so every layer moves by the same
# *relative* amount per step. It was designed for large-batch pretraining; in fine-tuning the body is already
# good and the new head starts from a random, small-norm initialisation, so a layer-wise relative step treats
# the two very differently from Adam's per-coordinate step. fastai ships its own Lamb (`lamb_fastai`: the trust
# ratio is measured on the update before weight decay and capped at 10; see `docs/formulas.md` §5). SGD with
# momentum is the classic baseline — the PyTorch transfer-learning tutorial uses it on this very ants-vs-bees set.
#
# **Question:** does the update rule matter for fastai's `fine_tune` recipe at a small batch, and does LAMB's
# trust ratio help or hurt? **Held fixed:** data, model, pretrained weights, `fine_tune(epochs, freeze_epochs=1)`
# with one-cycle schedules and discriminative learning rates, weight decay 0.01 (never on BatchNorm or biases),
# seeds. **Varied:** `optim.name`. SGD's step is not normalised by the gradient scale, so a learning rate that
# suits Adam is usually too small for it: SGD runs at the shared learning rate *and* at 10x, so that a
# difference is not only a learning-rate artefact.
#
# Mode: `SMALL=1` runs a seconds-long smoke test on generated images (the numbers mean nothing); without it the
# notebook fine-tunes an ImageNet ResNet-34 on `hymenoptera_data` (env `JAXTL_DATA`, `JAXTL_PRETRAINED`) over 3
# seeds and writes `results.md`, `results.csv`, `runs.csv` and `results.png` into `JAXTL_NB_OUT`.

# %%
import jax
from IPython.display import Image, Markdown, display

from jaxtl import ablation
from jaxtl.train import enable_compilation_cache

S = ablation.settings("01_optimizers")
base = ablation.base_config(S)
enable_compilation_cache(base.train.compile_cache_dir)  # variants that share a step compile it once
print(ablation.run_note(S, base))
print("jax", jax.__version__, "| output folder:", S.out_dir)

# %%
EPOCHS = 1 if S.small else 4  # unfrozen epochs, after one frozen epoch
LR = 2e-3  # fine_tune's base_lr (fastai's default)
base.train.recipe = "fine_tune"
base.train.epochs, base.train.freeze_epochs, base.train.lr = EPOCHS, 1, LR

variants = {
    "adamw": {"optim.name": "adamw"},
    "lamb": {"optim.name": "lamb"},
    "lamb_fastai": {"optim.name": "lamb_fastai"},
    "sgd": {"optim.name": "sgd"},
    "sgd, lr x10": {"optim.name": "sgd", "train.lr": 10 * LR},
}
rows, histories = ablation.run_variants(base, variants, S.seeds, runs_dir=S.out_dir / "runs")

# %%
METRICS = ("error_rate", "valid_loss", "train_loss")
summary = ablation.summarize(rows, METRICS)
title = "Optimisers for fine_tune"
paths = ablation.write_results(summary, rows, S.out_dir, METRICS, title=title, note=ablation.run_note(S, base))
display(Markdown(ablation.markdown_table(summary, METRICS)))
plot = ablation.plot_results(summary, S.out_dir / "results.png", ("error_rate", "valid_loss"), histories,
                             title=title)
display(Image(filename=str(plot)))
print(*paths.values(), plot, sep="\n")

# %% [markdown]
# **Reading the table.** Final-epoch metrics on the validation set, mean ± sample standard deviation over seeds
# (seeds change the head's initialisation, dropout and the data order; the split is fixed). With ~150 validation
# images one image is ~0.7 % error rate, so differences smaller than one or two standard deviations are noise.
# Compare `sgd` with `sgd, lr x10` before reading anything into SGD vs the adaptive methods, and the two LAMB
# variants with each other to see whether the trust-ratio details (cap, decay inside or outside the ratio) matter.
# Per-epoch histories are in `runs/<variant>/seed<k>/history.csv`.
