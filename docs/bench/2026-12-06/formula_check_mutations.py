"""Break each function the formula checks cover with a one-line mutation and run scripts/check_formulas.py.

Run from the root of a scratch worktree (it edits jaxtl's source in place and restores it after each run):
    python docs/bench/2026-12-06/formula_check_mutations.py   ->  /tmp/mutations.json
"""

import json
import re
import subprocess
import sys

M = [
 ("adam (fastai Adam)", "jaxtl/optim/transforms.py", 157, "eps=eps, eps_root", "eps=10 * eps, eps_root"),
 ("lamb (You et al.)", "jaxtl/optim/transforms.py", 166, "weight_decay=weight_decay, mask",
  "weight_decay=2 * weight_decay, mask"),
 ("lamb_fastai trust ratio", "jaxtl/optim/transforms.py", 135, "(1 - learning_rate * weight_decay)",
  "(1 - 2 * learning_rate * weight_decay)"),
 ("sgd momentum", "jaxtl/optim/transforms.py", 182, "decay=momentum,", "decay=0.9 * momentum,"),
 ("build_optimizer frozen labels", "jaxtl/optim/build.py", 93, "lab if m else groups.FROZEN", "lab"),
 ("one_cycle lr", "jaxtl/schedules.py", 101, "lr / div, lr,", "lr / (2 * div), lr,"),
 ("fine_tune_plan base_lr halving", "jaxtl/schedules.py", 140, "base_lr /= 2", "base_lr /= 3"),
 ("lr_find_schedule", "jaxtl/schedules.py", 154, "/ num_it)", "/ (num_it + 1))"),
 ("valley", "jaxtl/schedules.py", 188, "int(sections / 2)", "int(sections / 3)"),
 ("SmoothLoss debias", "jaxtl/metrics.py", 89, "self.beta**self.count", "self.beta**(self.count + 1)"),
 ("even_mults (discriminative lrs)", "jaxtl/groups.py", 134, "(1 / (n - 1))", "(1 / n)"),
 ("wd_mask (no decay on norms/biases)", "jaxtl/groups.py", 127, "not is_norm_or_bias(p)", "True"),
]
out = []
for name, path, line, old, new in M:
    src = open(path).read().split("\n")
    assert old in src[line - 1], (name, src[line - 1])
    orig = "\n".join(src)
    src[line - 1] = src[line - 1].replace(old, new, 1)
    open(path, "w").write("\n".join(src))
    try:
        r = subprocess.run([sys.executable, "scripts/check_formulas.py"], capture_output=True, text=True)
    finally:
        open(path, "w").write(orig)
    failed = [row for row in r.stdout.splitlines() if " FAIL " in row]
    m = re.search(r"(\d+)/(\d+) checks passed", r.stdout)
    rules = sorted({re.split(r"\s{2,}", row.strip())[0] for row in failed})
    out.append({"mutation": name, "where": f"{path}:{line}", "change": f"{old} -> {new}", "rc": r.returncode,
                "passed": m.group(0) if m else r.stderr[-300:], "failing_rules": rules})
    print(json.dumps(out[-1]), flush=True)
json.dump(out, open("/tmp/mutations.json", "w"), indent=1)
