"""Worker processes for tests/test_distributed.py (one JAX process each; see the test for how they are launched).

    worker.py reference DATA WORKDIR OUT CACHE   1 process (2 CPU devices): the same global batches as the 2-process
                                                 run (process shards 0 and 1 of build_data, concatenated), trained
                                                 by the Learner; checkpoints in WORKDIR
    worker.py cli DATA OUT CACHE REF             one of N processes of ``python -m jaxtl.main`` (jax.distributed from
                                                 JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) with
                                                 its default work dir under the cwd, recording the batches it
                                                 consumed and the files it wrote; then restores the reference run's
                                                 checkpoint (REF) on the N processes, and runs a stop test
    worker.py resume DATA WORKDIR OUT CACHE RUN  1 process (2 CPU devices): loads RUN's (the 2-process run's) final
                                                 weights, then resumes WORKDIR, a copy of RUN stepped back to its
                                                 first checkpoint, and finishes it on the same global batches

Each writes OUT.json (scalars, lists) and OUT.npz (flattened parameter trees).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from jaxtl.cpu_defaults import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()  # as jaxtl.main: jaxtl's XLA CPU flags before JAX starts its backend

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.py"
N_TRAIN, N_VALID, SIDE = 24, 7, 40


def make_dataset(root: Path) -> Path:
    """``root/train/c<i>/i.png`` for i < 24 (class i = image i) and ``root/valid/c<i>/i.png`` for 7 of the classes:
    noise images with a class-dependent colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, ids in (("train", range(N_TRAIN)), ("valid", range(0, 3 * N_VALID, 3))):
        for i in ids:
            d = root / split / f"c{i:02d}"
            d.mkdir(parents=True, exist_ok=True)
            colour = np.array([(37 * i) % 256, (91 * i) % 256, (53 * i + 100) % 256], np.float64)
            img = np.clip(colour + rng.normal(0, 40, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def load_config(data: str, cache: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dist_config", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.data.path = data
    cfg.train.compile_cache_dir = cache
    return cfg


def flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def host_variables(learn) -> dict[str, np.ndarray]:
    """This process's own replica of params + batch_stats (not a gathered copy)."""
    v = learn.par.to_host(learn.variables)
    return flat({"params": v["params"], "batch_stats": v["batch_stats"]})


STEP_HOOKS: list = []  # called with (epoch, step) before a recorded batch is handed to the Learner


def record_batches(batches, log: list, epoch: int, start_step: int):
    for i, b in enumerate(batches, start=start_step):
        log.append({"epoch": epoch, "step": i, "labels": [int(y) for y in b["label"]],
                    "checksum": float(np.asarray(b["image"], np.float64).sum())})
        for hook in STEP_HOOKS:
            hook(epoch, i)
        yield b


def write(out: str, info: dict, arrays: dict[str, np.ndarray]) -> None:
    np.savez(out + ".npz", **arrays)
    Path(out + ".json").write_text(json.dumps(info))


def run_info(learn) -> dict:
    return {"losses": [float(x) for x in learn.step_losses], "history": learn.history,
            "global_step": learn.global_step}


class TwoShards:
    """The global batches of a 2-process run, in one process: process shards 0 and 1 of ``build_data``
    concatenated in mesh order (process 0's rows first, as ``make_array_from_process_local_data`` lays them out)."""

    def __init__(self, shards, log: list) -> None:
        self.shards, self.log = shards, log
        self.batch_size = sum(s.batch_size for s in shards)

    def __getattr__(self, name):
        return getattr(self.shards[0], name)

    def train_batches(self, epoch: int, start_step: int = 0):
        parts = [record_batches(s.train_batches(epoch, start_step), self.log, epoch, start_step) for s in self.shards]
        for bs in zip(*parts, strict=True):
            yield {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}

    def valid_batches(self, epoch=None):
        for bs in zip(*[s.valid_batches() for s in self.shards], strict=True):
            yield {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}


def reference(data: str, workdir: str, out: str, cache: str) -> None:
    import jax

    from jaxtl.data import build_data
    from jaxtl.learner import Learner, run_recipe
    from jaxtl.train import enable_compilation_cache

    assert jax.process_count() == 1 and jax.device_count() == 2, jax.devices()
    cfg = load_config(data, cache)
    enable_compilation_cache(cache)
    learn = Learner.from_config(cfg, workdir=workdir)
    log: list = []
    b = int(cfg.train.batch_size) // 2
    learn.data = TwoShards([build_data(cfg.data, b, int(cfg.seed), p, 2) for p in range(2)], log)
    init = {f"init/{k}": v for k, v in host_variables(learn).items()}
    run_recipe(learn, cfg)
    probs, labels = learn.get_valid_preds()
    info = run_info(learn) | {"batches": log, "valid_labels": labels.tolist()}
    write(out, info, host_variables(learn) | init | {"valid_probs": probs})
    learn.close()


def cli(data: str, out: str, cache: str, ref_workdir: str) -> None:
    """``jaxtl.main`` as the user runs it (default work dir under the current one), plus recording hooks. Process
    1's clock reads an hour ahead (another time zone): the default work dir must still be process 0's."""
    import time

    if os.environ.get("JAX_PROCESS_ID") == "1":
        real_localtime = time.localtime
        time.localtime = lambda secs=None: real_localtime((time.time() if secs is None else secs) + 3600)
    base = Path.cwd().resolve()
    written: list[str] = []

    def audit(event: str, args: tuple) -> None:  # files this process creates or changes under the cwd
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in ("os.rename", "os.remove", "os.mkdir"):
            # relative to a directory fd (shutil.rmtree: orbax deleting an old checkpoint) is not under the cwd
            dir_fds = {"os.rename": args[2:4], "os.remove": args[1:2], "os.mkdir": args[2:3]}[event]
            if any(fd not in (None, -1) for fd in dir_fds):
                return
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, str | os.PathLike):
            p = Path(os.fsdecode(path)).resolve()
            if p == base or base in p.parents:
                written.append(str(p))

    sys.addaudithook(audit)
    import jax

    from jaxtl import learner as jlearner
    from jaxtl import main as jmain
    from jaxtl.checkpoint import Checkpointer
    from jaxtl.data.pipeline import DataBundle

    log: list = []
    original = DataBundle.train_batches
    DataBundle.train_batches = lambda self, epoch, start_step=0: record_batches(
        original(self, epoch, start_step), log, epoch, start_step)
    captured = {}
    run_recipe = jlearner.run_recipe

    def capture(learn, *a, **k):
        captured["learn"] = learn
        return run_recipe(learn, *a, **k)

    jlearner.run_recipe = capture
    sys.argv = ["jaxtl.main", f"--config={CONFIG}", f"--config.data.path={data}",
                f"--config.train.compile_cache_dir={cache}"]
    try:
        jmain.run()
        code = 0
    except SystemExit as e:
        code = e.code
    assert code in (0, None), f"jaxtl.main exited with {code!r}"
    learn = captured["learn"]
    wd = learn.workdir.resolve()
    paths = [Path(p) for p in written]
    outside = sorted({str(p) for p in paths if p != wd and wd not in p.parents and p not in wd.parents})
    in_wd = sorted({str(p.relative_to(wd)) for p in paths if p == wd or wd in p.parents})
    probs, labels = learn.get_valid_preds(gather=True)  # a collective: every process calls it
    # the reference run's checkpoint (1 process, 2 devices) restored onto this run's N-process mesh
    target = learn.par.get_state(learn.state)
    ck = Checkpointer(ref_workdir)
    restored = ck.restore_state(target, step=ck.latest_step())
    ck.close()
    leaf = jax.tree.leaves(restored.params)[0]
    info = run_info(learn) | {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "batches": log, "written": in_wd,
        "written_outside": outside, "workdir": str(wd),
        "valid_labels": labels.tolist(), "restored_devices": len(leaf.sharding.device_set),
        "restored_fully_replicated": bool(leaf.is_fully_replicated), "restored_step": int(np.asarray(
            restored.step.addressable_data(0))),
    }
    r = learn.par.to_host(restored)
    arrays = host_variables(learn) | {"valid_probs": probs}
    arrays |= {f"restored/{k}": v for k, v in flat({"params": r.params, "batch_stats": r.batch_stats}).items()}
    write(out, info, arrays)

    # a stop requested on process 1 only (as when a signal reaches one host): the recipe run again from here, into
    # another checkpoint dir; both processes must stop after the same step and checkpoint it (without agreement
    # process 0 would start the next step alone and the pair would hang)
    learn._ckpt.close()
    learn._ckpt, learn._logger = Checkpointer(str(wd) + "_stop"), None
    first = learn.global_step
    if jax.process_index() == 1:
        STEP_HOOKS.append(lambda epoch, step: learn.request_stop() if step == 0 else None)
    jlearner.run_recipe(learn, learn.config)
    stop = {"stopped_early": learn.stopped_early, "stop_reason": learn.stop_reason,
            "steps": learn.global_step - first, "checkpoint": learn._ckpt.latest_step()}
    Path(out + "_stop.json").write_text(json.dumps(stop))

    # train.parallel="pmap" over the 2 processes: the eval step's psum must reduce across processes too
    from jaxtl import metrics
    from jaxtl.parallel import DataParallel
    from jaxtl.train import make_eval_step

    pm = DataParallel("pmap")
    step = pm.eval_step(make_eval_step(learn.model, axis_name=pm.model_axis_name, transform=learn.transform))
    variables = pm.put_state(learn.par.to_host(learn.variables))
    total = None
    for b in learn.data.valid_batches():
        sums = step(variables, pm.put_batch(b))
        total = sums if total is None else jax.tree.map(lambda a, c: a + c, total, sums)
    pmap_sums = {k: pm.scalar(v) for k, v in total.items()}
    evals = {"pmap": metrics.summarize(pmap_sums) | {"count": pmap_sums["count"]}, "jit": learn.validate()}
    Path(out + "_pmap.json").write_text(json.dumps(evals))
    learn.close()


def resume(data: str, workdir: str, out: str, cache: str, run_workdir: str) -> None:
    """1 process, 2 devices: load the 2-process run's final weights (RUN) as ``jaxtl.predict`` does, then resume
    WORKDIR (a copy of that run stepped back to its epoch-0 checkpoint) on the 2-process global batches."""
    import jax

    from jaxtl.checkpoint import load_variables
    from jaxtl.data import build_data
    from jaxtl.learner import Learner, run_recipe
    from jaxtl.train import enable_compilation_cache

    assert jax.process_count() == 1 and jax.device_count() == 2, jax.devices()
    cfg = load_config(data, cache)
    enable_compilation_cache(cache)
    loaded = flat(load_variables(run_workdir, best=False))
    learn = Learner.from_config(cfg, workdir=workdir)
    log: list = []
    b = int(cfg.train.batch_size) // 2
    learn.data = TwoShards([build_data(cfg.data, b, int(cfg.seed), p, 2) for p in range(2)], log)
    run_recipe(learn, cfg, resume=True)
    info = run_info(learn) | {"batches": log}
    write(out, info, host_variables(learn) | {f"loaded/{k}": v for k, v in loaded.items()})
    learn.close()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"reference": reference, "cli": cli, "resume": resume}[mode](*args)
