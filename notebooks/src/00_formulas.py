# %% [markdown]
# # Formula checks: jaxtl's optimisers and schedules against their papers
#
# Every optimiser (Adam, AdamW, fastai's Adam, LAMB, fastai's Lamb, SGD with momentum and Nesterov) and every
# schedule (one-cycle, `fine_tune`'s phases, `lr_find`'s sweep and valley rule) has an independent NumPy
# transcription of its published equation in `jaxtl/reference/`. The checks below run jaxtl (float32, jitted)
# and the transcription (float64) side by side for 100 steps on a random ResNet-shaped parameter tree —
# zero-norm layers, frozen leaves, weight decay on and off, scheduled momentum — and report the largest
# difference against a tolerance. The equations, symbols ↔ config names and code locations:
# [docs/formulas.md](../docs/formulas.md).
#
# `SMALL=1` changes nothing here (the checks take well under a minute); outputs go to `JAXTL_NB_OUT`.

# %%
import dataclasses

import numpy as np
from IPython.display import Image, Markdown, display
from matplotlib.figure import Figure

from jaxtl import ablation
from jaxtl.reference import checks

S = ablation.settings("00_formulas")
results = checks.run_all()
n_pass = sum(r.passed for r in results)
table = checks.format_table(results, markdown=True)
display(Markdown(f"**{n_pass} of {len(results)} checks pass** ({checks.N_STEPS} steps per optimiser rule; "
                 "relative difference = max over steps and leaves of |jaxtl − ref|∞ / |ref|∞).\n\n" + table))

# %%
S.out_dir.mkdir(parents=True, exist_ok=True)
(S.out_dir / "results.md").write_text(f"# Formula checks\n\n{n_pass}/{len(results)} pass\n\n{table}\n")
ablation.write_csv([{**dataclasses.asdict(r), "passed": r.passed} for r in results], S.out_dir / "results.csv")

# Margin to the tolerance, worst quantity per rule (exact checks with tolerance 0 plot at the floor when equal)
worst: dict[str, float] = {}
for r in results:
    ratio = r.max_rel_diff / r.tolerance if r.tolerance > 0 else (0.0 if r.max_rel_diff == 0 else np.inf)
    worst[r.rule] = max(worst.get(r.rule, 0.0), ratio)
names = list(worst)
ratios = np.maximum(np.array([worst[n] for n in names]), 1e-4)
fig = Figure(figsize=(8, 0.28 * len(names) + 1.2), layout="constrained")
ax = fig.subplots()
ax.barh(np.arange(len(names)), ratios, color=["C2" if v <= 1 else "C3" for v in ratios])
ax.axvline(1.0, color="k", lw=1)
ax.set_xscale("log")
ax.set_yticks(np.arange(len(names)), names, fontsize=7)
ax.invert_yaxis()
ax.set_xlabel("max relative difference / tolerance (pass: <= 1)")
fig.savefig(S.out_dir / "results.png", dpi=100)
display(Image(filename=str(S.out_dir / "results.png")))
print(S.out_dir / "results.md", S.out_dir / "results.csv", S.out_dir / "results.png", sep="\n")
