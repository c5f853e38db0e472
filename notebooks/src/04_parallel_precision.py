# %% [markdown]
# # `jit` vs `pmap`, float32 vs bfloat16: speed and accuracy
#
# jaxtl's default data parallelism is `jax.jit` over a device mesh with the batch sharded along it (XLA inserts
# the gradient all-reduce); `pmap` is the older explicit SPMD style, kept for comparison. Both compute the same
# update — same global batch, BatchNorm moments over the global batch — except for the dropout masks (under
# `pmap` each device folds its index into the dropout key, so even on one device its masks differ from `jit`'s).
# The metrics should therefore agree within the seed-to-seed spread; a larger gap would be a bug. The interesting
# number is throughput. `train.precision=bfloat16`
# runs the convolutions in bf16 with float32 parameters and optimiser state: on accelerators with bf16 units it
# should be faster at little or no cost in accuracy; on a CPU without bf16 units it is usually slower.
#
# **Measured:** training images/s over the epochs that do not compile (every epoch of a phase but the first;
# data loading included, validation excluded), and the final validation metrics. **Run:** a pretrained ResNet,
# unfrozen, `fit_one_cycle(epochs)` (the full-network step, the expensive one), same seeds for all variants.
# Throughput depends on the machine: the results file names the devices.
#
# Mode: `SMALL=1` is a seconds-long smoke test on generated 32 px images (the numbers mean nothing); the real mode
# runs ResNet-34 at 224 px on `hymenoptera_data` over 3 seeds. Outputs go to `JAXTL_NB_OUT`.

# %%
import jax
from IPython.display import Image, Markdown, display

from jaxtl import ablation
from jaxtl.train import enable_compilation_cache

S = ablation.settings("04_parallel_precision")
base = ablation.base_config(S)
enable_compilation_cache(base.train.compile_cache_dir)  # variants that share a step compile it once
print(ablation.run_note(S, base))
print("jax", jax.__version__, "| devices:", jax.devices(), "| output folder:", S.out_dir)

# %%
EPOCHS = 2 if S.small else 3  # >= 2: the first epoch compiles and is left out of images/s
base.train.recipe = "one_cycle"
base.train.epochs, base.train.lr = EPOCHS, 1e-3

variants = {
    f"{parallel}, {precision}": ablation.Variant({"train.parallel": parallel, "train.precision": precision},
                                                 fit=ablation.unfreeze_then_recipe)
    for parallel in ("jit", "pmap") for precision in ("float32", "bfloat16")
}
rows, histories = ablation.run_variants(base, variants, S.seeds, runs_dir=S.out_dir / "runs")

# %%
METRICS = ("img_s", "error_rate", "valid_loss", "train_loss")
summary = ablation.summarize(rows, METRICS)
title = "jit vs pmap, float32 vs bfloat16"
paths = ablation.write_results(summary, rows, S.out_dir, METRICS, title=title, note=ablation.run_note(S, base))
display(Markdown(ablation.markdown_table(summary, METRICS)))
plot = ablation.plot_results(summary, S.out_dir / "results.png", ("img_s", "error_rate"), histories, title=title)
display(Image(filename=str(plot)))
print(*paths.values(), plot, sep="\n")

# %% [markdown]
# **Reading the table.** `img_s` is training throughput (higher is better); on one device `jit` and `pmap` run
# the same computation and should differ only by dispatch overhead, and their metrics only as much as two seeds
# do (different dropout masks). The float32 and bfloat16 rows of one mode
# should agree in `error_rate` within the seed spread; a systematic gap would mean bf16 rounding matters for this
# recipe. Per-epoch histories (with each epoch's seconds) are in `runs/<variant>/seed<k>/history.csv`.
