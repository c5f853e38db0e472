"""ResNet train-step images/s: jaxtl vs a PyTorch reference in the same process, alternating.

    python scripts/bench_train.py --arch resnet34 --size 224 --batch 32 [--steps 5] [--warmup 2] [--rounds 5]
        [--json out.json] [--phases unfrozen,frozen_bn,frozen_no_bn] [--precisions float32,bfloat16] [--no-torch]
        [--layouts nchw,channels_last] [--xla-flags "..."] [--variant NAME=XLA_FLAGS ...] [--threads N]
        [--kernels auto|plain|cpu]
        [--cpu-devices N]

Results, the CPU configuration study and what limits the speed: docs/performance.md.

For every (phase, precision) row:

- jaxtl: ``create_model(arch, dtype)`` + fastai head, ``jaxtl.optim.build_optimizer`` (fastai Adam, wd 0.01, no
  decay on BatchNorm/bias) with ``groups.trainable_mask`` for the phase, ``jaxtl.train.make_train_step`` compiled
  by ``jaxtl.parallel.DataParallel("jit").train_step`` (the state is donated), exactly as the Learner runs it.
- PyTorch: the same torchvision-layout ResNet + fastai head defined below, ``torch.optim.AdamW`` (decoupled
  decay, as fastai's Adam) with the same groups, in NCHW and channels_last; torch's best layout is the reference.
- phases: ``unfrozen`` (everything trains); ``frozen_bn`` (fastai ``freeze()``, ``train_bn=True``: head + every
  BatchNorm affine trains); ``frozen_no_bn`` (``freeze()`` with ``train_bn=False``: only the head trains; jaxtl runs
  the body forward-only, torch's autograd does the same since no body leaf needs a gradient). BatchNorm is in train
  mode in every phase (running statistics move), as in fastai.
- precisions: ``float32``; ``bfloat16`` = jaxtl ``dtype=bfloat16`` compute with float32 parameters, torch
  ``autocast(cpu, bfloat16)`` with float32 parameters.

Timing: after ``--warmup`` untimed steps each, ``--steps`` timed steps per framework/layout are run in
``--rounds`` interleaved blocks (jaxtl block, torch NCHW block, torch channels_last block, repeat), so machine
noise hits every contestant. img/s = batch * steps / (sum of that contestant's block times). Each row also keeps
every block's rate and the fastest block's (``*_best_block_img_s``, ``ratio_best_blocks``: closest to what a quiet
machine gives) and the 1-minute load average at its start and end.

Memory: the process's peak RSS (VmHWM, reset before each block through /proc/self/clear_refs; psutil sampling
where that is not allowed) during each contestant's blocks, plus XLA's own accounting of the jaxtl step
(arguments + outputs - donated aliases + temporaries). On an accelerator: device peak bytes in use.

Model FLOP utilisation (MFU): FLOPs of one step from XLA's cost analysis of the lowered (global, unpartitioned)
step, times steps/s, over the device's peak. On an accelerator (``jax.default_backend() != "cpu"``) jaxtl runs
alone and the peak is ``--peak-tflops`` or a built-in table of dense bf16 / tf32 peaks. On CPU the peak is
measured in the same run (:func:`measure_cpu_peak`: the faster of XLA's and torch's ``2048^3`` matmul in the
row's precision), and the PyTorch reference gets an MFU too, from the same model FLOPs per image.

``--variant NAME=XLA_FLAGS`` (repeatable) compares XLA configurations: XLA reads its flags once per process, so
each variant's jaxtl runs in a child process of its own (idle on a pipe between its blocks), lock-stepped with
the other variants and with torch (which stays in this process); the first variant fills the ``jaxtl_*`` fields
and every variant gets a line of its own (``rows[i]["variants"]``). Use it on a shared machine, where runs made
one after the other see different loads. Every variant (and the in-process jaxtl) runs with jaxtl's CPU defaults
(``jaxtl/cpu_defaults.py``) unless its flags set the same XLA flag; words of the form ``NAME=VALUE`` without a
leading ``-`` are environment variables, so ``--variant xla_defaults=JAXTL_CPU_DEFAULTS=0`` measures XLA's own
defaults, except ``kernels=<set>``, which sets the variant's ``model.kernels`` (``--variant plain=kernels=plain
--variant cpu=kernels=cpu``; ``cpu-no_barrier`` etc. leave out one CPU kernel). ``PYTHONPATH=<checkout>`` runs another
jaxtl checkout's model and step (an A/B against an earlier commit).

The JSON (``--json PATH``) has the unfrozen float32 row's figures at the top level (``jaxtl_img_s``,
``torch_img_s``, ``ratio``), ``frozen_no_bn_img_s`` / ``frozen_no_bn_vs_unfrozen`` (float32), every row under
``rows`` and the software/hardware/flags under ``env``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # appended: a variant's PYTHONPATH=<checkout> (an older jaxtl) comes first
    sys.path.append(str(ROOT))

PHASES = ("unfrozen", "frozen_bn", "frozen_no_bn")
PRECISIONS = ("float32", "bfloat16")
LAYOUTS = ("nchw", "channels_last")
ARCHS = ("resnet18", "resnet34", "resnet50")
LR = 1e-3

# Dense peak TFLOP/s per device for MFU: (bf16, fp32 as XLA runs it by default: tf32 on NVIDIA, bf16 passes on TPU).
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "h100 pcie": (756.0, 378.0),
    "h100": (989.4, 494.7),
    "h200": (989.4, 494.7),
    "gh200": (989.4, 494.7),
    "a100": (312.0, 156.0),
    "l4": (121.0, 60.0),
    "tpu v4": (275.0, 275.0),
    "tpu v5 lite": (197.0, 197.0),
    "tpu v5e": (197.0, 197.0),
    "tpu v5p": (459.0, 459.0),
    "tpu v6": (918.0, 918.0),
}


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------
class PeakRSS:
    """High-water mark of this process's resident memory over a window.

    Linux: ``echo 5 > /proc/self/clear_refs`` resets VmHWM, which the kernel then tracks exactly. Elsewhere (or
    when that write is refused) a thread samples psutil's RSS every 5 ms.
    """

    def __init__(self) -> None:
        self.exact = self._try_reset()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return PeakRSS._hwm_kb() is not None
        except OSError:
            return False

    @staticmethod
    def _hwm_kb() -> int | None:
        try:
            with open("/proc/self/status") as f:
                m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
            return int(m.group(1)) if m else None
        except OSError:
            return None

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self._peak = max(self._peak, proc.memory_info().rss)
            self._stop.wait(0.005)

    @contextmanager
    def window(self) -> Iterator[list[float]]:
        """``with peak.window() as out: ...`` -> ``out[0]`` = peak RSS in MiB during the block."""
        out: list[float] = [float("nan")]
        if self.exact:
            self._try_reset()
            yield out
            out[0] = (self._hwm_kb() or 0) / 1024
            return
        self._peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        try:
            yield out
        finally:
            self._stop.set()
            self._thread.join()
            out[0] = self._peak / 2**20


# ---------------------------------------------------------------------------------------------------------------
# PyTorch reference: torchvision-layout ResNet + fastai head
# ---------------------------------------------------------------------------------------------------------------
def torch_model(arch: str, num_classes: int) -> Any:
    """torchvision's resnet18/34/50 body (names, paddings, v1.5 strides) + fastai's ``create_head``."""
    import torch
    from torch import nn

    kind, layers = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                    "resnet50": ("bottleneck", (3, 4, 6, 3))}[arch]

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, cin: int, planes: int, stride: int, down: nn.Module | None) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = down

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            idt = x if self.downsample is None else self.downsample(x)
            y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(y + idt)

    class Bottle(nn.Module):
        expansion = 4

        def __init__(self, cin: int, planes: int, stride: int, down: nn.Module | None) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = down

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            idt = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            return self.relu(self.bn3(self.conv3(y)) + idt)

    block = Basic if kind == "basic" else Bottle
    mods: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                             nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, n in enumerate(layers):
        planes, stage = 64 * 2**i, []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            down = None
            if j == 0 and (stride != 1 or cin != planes * block.expansion):
                down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
            stage.append(block(cin, planes, stride, down))
            cin = planes * block.expansion
        mods.append(nn.Sequential(*stage))
    for m in mods:
        for sub in m.modules():
            if isinstance(sub, nn.Conv2d):
                nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")

    class ConcatPool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.amax(x, dim=(2, 3)), torch.mean(x, dim=(2, 3))], 1)

    head = nn.Sequential(ConcatPool(), nn.BatchNorm1d(2 * cin), nn.Dropout(0.25), nn.Linear(2 * cin, 512, bias=False),
                         nn.ReLU(inplace=True), nn.BatchNorm1d(512), nn.Dropout(0.5),
                         nn.Linear(512, num_classes, bias=False))
    return nn.Sequential(nn.Sequential(*mods), head)


class TorchRunner:
    """One torch contestant: model + AdamW + a fixed batch in one memory layout."""

    def __init__(self, arch: str, num_classes: int, phase: str, precision: str, layout: str,
                 images: np.ndarray, labels: np.ndarray) -> None:
        import torch

        torch.manual_seed(0)
        self.torch = torch
        model = torch_model(arch, num_classes)
        body = model[0]
        modules = dict(body.named_modules())
        for name, p in body.named_parameters():
            is_bn = isinstance(modules[name.rsplit(".", 1)[0]], torch.nn.BatchNorm2d)
            p.requires_grad_(phase == "unfrozen" or (phase == "frozen_bn" and is_bn))
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.model, self.x, self.y = model.train(), x, torch.from_numpy(labels.astype(np.int64))
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=LR, betas=(0.9, 0.99), eps=1e-5, foreach=True)
        self.bf16 = precision == "bfloat16"

    def step(self) -> float:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(self.x)
        loss = torch.nn.functional.cross_entropy(out.float(), self.y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def run(self, n: int) -> float:
        """``n`` steps; returns the last loss (synchronous on CPU)."""
        loss = float("nan")
        for _ in range(n):
            loss = self.step()
        return loss


# ---------------------------------------------------------------------------------------------------------------
# jaxtl contestant
# ---------------------------------------------------------------------------------------------------------------
class JaxtlRunner:
    """jaxtl's real train step for one phase/precision, compiled once, state donated between calls."""

    def __init__(self, arch: str, num_classes: int, phase: str, precision: str, images: np.ndarray,
                 labels: np.ndarray, parallel: str = "jit", kernels: str = "auto") -> None:
        import jax
        import jax.numpy as jnp

        from jaxtl import groups
        from jaxtl.config import base_config
        from jaxtl.models import create_model
        from jaxtl.optim import build_optimizer
        from jaxtl.parallel import DataParallel
        from jaxtl.train import TrainState, make_train_step

        self.jax = jax
        dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
        self.dp = DataParallel(parallel)
        self.dp.check_batch_size(len(labels), "--batch")
        # "auto" is passed as no argument, so that a variant can run an older jaxtl (PYTHONPATH=...) for an A/B
        kw = {} if kernels == "auto" else {"kernels": kernels}
        model = create_model(arch, num_classes, "fastai", dtype, axis_name=self.dp.model_axis_name, **kw)
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *images.shape[1:]), jnp.float32), False))(
            jax.random.PRNGKey(0))
        params = variables["params"]
        n_frozen = 0 if phase == "unfrozen" else -1
        train_bn = phase != "frozen_no_bn"
        trainable = groups.trainable_mask(params, n_frozen, train_bn)
        if "trainable" in inspect.signature(build_optimizer).parameters:
            tx = build_optimizer(base_config().optim, params, [LR] * groups.N_GROUPS, None, trainable)
        else:  # a checkout from before 2026-12-06 (A/B through PYTHONPATH): (n_frozen, train_bn) arguments
            tx = build_optimizer(base_config().optim, params, [LR] * groups.N_GROUPS, None, n_frozen, train_bn)
        state = TrainState.create(params, variables["batch_stats"], tx, jax.random.PRNGKey(1))
        fn = make_train_step(model, tx, trainable, axis_name=self.dp.model_axis_name)
        self.state = self.dp.put_state(state)
        self.batch = self.dp.put_batch({"image": images, "label": labels.astype(np.int32)})
        jitted = self.dp.train_step(fn)
        t0 = time.perf_counter()
        self.flops = float("nan")
        self.xla_mem_mb = float("nan")
        if parallel == "jit":
            lowered = jitted.lower(self.state, self.batch)
            self.flops = _flops(lowered)
            compiled = lowered.compile()
            self.xla_mem_mb = _xla_mem_mb(compiled)
            self.fn: Callable[..., Any] = compiled
        else:
            self.fn = jitted
        self.state, out = self.fn(self.state, self.batch)
        out["loss"].block_until_ready()
        self.compile_s = time.perf_counter() - t0
        self.loss = out["loss"]

    def run(self, n: int) -> float:
        """``n`` steps, blocking on the last loss; returns it."""
        for _ in range(n):
            self.state, out = self.fn(self.state, self.batch)
            self.loss = out["loss"]
        return self.dp.scalar(self.loss)

    def device_peak_mb(self) -> float:
        stats = [d.memory_stats() or {} for d in self.dp.local_devices]
        peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
        return max(peaks) / 2**20 if peaks else float("nan")


def _flops(lowered: Any) -> float:
    try:
        ca = lowered.cost_analysis()
    except Exception:  # cost analysis is best-effort across backends
        return float("nan")
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def _xla_mem_mb(compiled: Any) -> float:
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        return total / 2**20
    except Exception:  # not every backend reports it
        return float("nan")


class WorkerJaxtl:
    """A jaxtl contestant in its own process, so that it can run under its own XLA_FLAGS (read once per process).

    The child (this script with ``--_worker SPEC``) builds a :class:`JaxtlRunner`, then runs ``n`` steps per
    ``RUN n`` line on stdin and answers with the block's time, loss and peak RSS; it idles on the pipe meanwhile.
    """

    def __init__(self, name: str, xla_flags: str, spec: dict[str, Any]) -> None:
        import subprocess

        # NAME=VALUE words set environment variables (e.g. JAXTL_CPU_DEFAULTS=0: XLA's own defaults), the rest
        # are XLA flags appended to the user's XLA_FLAGS
        words = xla_flags.split()
        env_words = dict(w.split("=", 1) for w in words if not w.startswith("-") and "=" in w)
        spec = {**spec, "kernels": env_words.pop("kernels", spec.get("kernels", "auto"))}  # model.kernels
        flags = " ".join(w for w in words if w.startswith("-") or "=" not in w)
        base = env_words.pop("XLA_FLAGS", os.environ.get("JAXTL_BENCH_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", "")))
        env = {**os.environ, **env_words, "XLA_FLAGS": (base + " " + flags).strip()}
        self.name, self.xla_flags = name, env["XLA_FLAGS"]
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = self._reply("READY")
        self.xla_flags = info.get("xla_flags", self.xla_flags)  # as the worker runs them (with jaxtl's defaults)
        self.compile_s, self.flops, self.xla_mem_mb = info["compile_s"], info["flops"], info["xla_mem_mb"]
        self.last_dt = self.last_peak_mb = float("nan")

    def _reply(self, tag: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        raise RuntimeError(f"jaxtl worker {self.name!r} (XLA_FLAGS={self.xla_flags!r}) exited with "
                           f"{self.proc.wait()}")

    def run(self, n: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"RUN {n}\n")
        self.proc.stdin.flush()
        out = self._reply("DONE")
        self.last_dt, self.last_peak_mb = out["dt"], out["peak_mb"]
        return out["loss"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def worker_main(spec_json: str) -> None:
    """Child side of :class:`WorkerJaxtl`."""
    spec = json.loads(spec_json)
    import jax

    from jaxtl.cpu_defaults import apply_cpu_defaults

    apply_cpu_defaults()  # before JAX starts: jaxtl's CPU defaults, unless the variant set JAXTL_CPU_DEFAULTS=0
    import jaxtl

    print(f"bench_train worker: jaxtl from {Path(jaxtl.__file__).parent}", file=sys.stderr, flush=True)
    if spec.get("cpu_devices"):
        jax.config.update("jax_num_cpu_devices", spec["cpu_devices"])
    rng = np.random.default_rng(0)
    images = rng.standard_normal((spec["batch"], spec["size"], spec["size"], 3), dtype=np.float32)
    labels = rng.integers(0, spec["num_classes"], spec["batch"])
    jx = JaxtlRunner(spec["arch"], spec["num_classes"], spec["phase"], spec["precision"], images, labels,
                     spec["parallel"], spec.get("kernels", "auto"))
    jx.run(spec["warmup"])
    print("READY " + json.dumps({"compile_s": jx.compile_s, "flops": jx.flops, "xla_mem_mb": jx.xla_mem_mb,
                                 "xla_flags": os.environ.get("XLA_FLAGS", "")}),
          flush=True)
    peak = PeakRSS()
    for line in sys.stdin:
        cmd, n = line.split()
        if cmd != "RUN":
            break
        with peak.window() as p:
            t0 = time.perf_counter()
            loss = jx.run(int(n))
            dt = time.perf_counter() - t0
        print("DONE " + json.dumps({"dt": dt, "loss": loss, "peak_mb": p[0]}), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def _blocks(steps: int, rounds: int) -> list[int]:
    rounds = max(1, min(rounds, steps))
    return [steps // rounds + (1 if i < steps % rounds else 0) for i in range(rounds)]


def _peak_tflops(device_kind: str, precision: str, override: float | None) -> float | None:
    if override:
        return override
    kind = device_kind.lower()
    for key, (bf16, fp32) in PEAK_TFLOPS.items():  # "h100 pcie" is listed before "h100"
        if key in kind:
            return bf16 if precision == "bfloat16" else fp32
    return None


def measure_cpu_peak(precision: str, use_torch: bool, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The CPU's dense-matmul peak for MFU, measured now: the best of ``repeats`` ``n x n x n`` products
    (``2 n^3`` FLOPs) through XLA (``jnp.dot``) and, with the torch reference, through ``torch.mm``, in
    ``precision``. Returns TFLOP/s per engine and ``peak`` = the faster one (what this machine can do)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
    a = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    out = {"xla": 2 * n**3 / best / 1e12}
    if use_torch:
        import torch

        ta = torch.from_numpy(np.asarray(a.astype(jnp.float32))).to(
            torch.bfloat16 if precision == "bfloat16" else torch.float32)
        torch.mm(ta, ta)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(ta, ta)
            best = min(best, time.perf_counter() - t0)
        out["torch"] = 2 * n**3 / best / 1e12
    out["peak"] = max(out.values())
    return out


def bench_row(args: argparse.Namespace, phase: str, precision: str, peak: PeakRSS, use_torch: bool,
              log: Callable[[str], None], cpu_peak: dict[str, float] | None = None) -> dict[str, Any]:
    import jax

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, args.size, args.size, 3), dtype=np.float32)
    labels = rng.integers(0, args.num_classes, args.batch)
    row: dict[str, Any] = {"arch": args.arch, "size": args.size, "batch": args.batch, "phase": phase,
                           "precision": precision, "loadavg_1m_start": _load()}

    contestants: dict[str, Any] = {}
    if args.variant:
        spec = {"arch": args.arch, "size": args.size, "batch": args.batch, "num_classes": args.num_classes,
                "phase": phase, "precision": precision, "parallel": args.parallel, "warmup": args.warmup,
                "cpu_devices": args.cpu_devices, "kernels": args.kernels}
        for name, flags in args.variant:  # built one after the other: no compile runs during a timed step
            contestants[f"jaxtl[{name}]"] = WorkerJaxtl(name, flags, spec)
        jx = contestants[f"jaxtl[{args.variant[0][0]}]"]
        row["jaxtl_variant"] = args.variant[0][0]
        row["jaxtl_xla_flags"] = jx.xla_flags
    else:
        with peak.window() as setup_peak:
            jx = JaxtlRunner(args.arch, args.num_classes, phase, precision, images, labels, args.parallel,
                             args.kernels)
            jx.run(args.warmup)
        row["jaxtl_setup_peak_rss_mb"] = setup_peak[0]
        contestants["jaxtl"] = jx
    jaxtl_key = next(iter(contestants))
    row["jaxtl_compile_s"] = jx.compile_s
    if use_torch:
        for layout in args.layouts:
            tr = TorchRunner(args.arch, args.num_classes, phase, precision, layout, images, labels)
            tr.run(args.warmup)
            contestants[f"torch_{layout}"] = tr
    log(f"  {phase}/{precision}: compiled in {jx.compile_s:.1f}s; timing {args.steps} steps x "
        f"{len(contestants)} contestant(s) in {len(_blocks(args.steps, args.rounds))} round(s)")

    times = {k: 0.0 for k in contestants}
    block_rates: dict[str, list[float]] = {k: [] for k in contestants}
    peaks = {k: 0.0 for k in contestants}
    losses: dict[str, float] = {}
    for n in _blocks(args.steps, args.rounds):
        for name, c in contestants.items():
            time.sleep(args.pause)  # let the other framework's spinning worker threads go idle
            with peak.window() as p:
                t0 = time.perf_counter()
                losses[name] = c.run(n)
                dt = time.perf_counter() - t0
            if isinstance(c, WorkerJaxtl):  # its own process: its own clock and memory
                dt, p[0] = c.last_dt, c.last_peak_mb
            times[name] += dt
            block_rates[name].append(args.batch * n / dt)
            peaks[name] = max(peaks[name], p[0])

    rate = {k: args.batch * args.steps / t for k, t in times.items()}
    row.update(jaxtl_img_s=rate[jaxtl_key], jaxtl_step_ms=1e3 * times[jaxtl_key] / args.steps,
               jaxtl_peak_rss_mb=peaks[jaxtl_key], jaxtl_xla_mem_mb=jx.xla_mem_mb, jaxtl_loss=losses[jaxtl_key],
               jaxtl_gflop_per_step=jx.flops / 1e9, jaxtl_block_img_s=block_rates[jaxtl_key])
    row["jaxtl_tflop_s"] = jx.flops * args.steps / times[jaxtl_key] / 1e12
    # the fastest block of each contestant: what a quiet machine gives (other processes slow some blocks)
    row["jaxtl_best_block_img_s"] = max(block_rates[jaxtl_key])
    torch_best = max((rate[f"torch_{lay}"] for lay in args.layouts), default=None) if use_torch else None
    if args.variant:
        row["variants"] = {
            name: {"xla_flags": c.xla_flags, "img_s": rate[f"jaxtl[{name}]"],
                   "vs_first": rate[f"jaxtl[{name}]"] / rate[jaxtl_key],
                   "ratio": rate[f"jaxtl[{name}]"] / torch_best if torch_best else None,
                   "block_img_s": block_rates[f"jaxtl[{name}]"], "best_block_img_s": max(block_rates[f"jaxtl[{name}]"]),
                   "peak_rss_mb": peaks[f"jaxtl[{name}]"],
                   "xla_mem_mb": c.xla_mem_mb, "compile_s": c.compile_s, "loss": losses[f"jaxtl[{name}]"]}
            for name, _ in args.variant for c in [contestants[f"jaxtl[{name}]"]]}
    if jax.default_backend() != "cpu" and isinstance(jx, JaxtlRunner):
        dev = jx.dp.local_devices[0]
        pk = _peak_tflops(dev.device_kind, precision, args.peak_tflops)
        row["device_peak_mb"] = jx.device_peak_mb()
        row["peak_tflops_per_device"] = pk
        row["mfu"] = row["jaxtl_tflop_s"] / (pk * jx.dp.n_devices) if pk else None
    elif cpu_peak is not None:  # MFU against this CPU's matmul peak, measured in the same run
        row["cpu_matmul_tflop_s"] = cpu_peak
        row["peak_tflops_per_device"] = cpu_peak["peak"]
        row["mfu"] = row["jaxtl_tflop_s"] / cpu_peak["peak"]
    if use_torch:
        per_layout = {lay: rate[f"torch_{lay}"] for lay in args.layouts}
        best = max(per_layout, key=per_layout.__getitem__)
        row.update(torch_img_s=per_layout[best], torch_layout=best, ratio=rate[jaxtl_key] / per_layout[best],
                   torch_peak_rss_mb=max(peaks[f"torch_{lay}"] for lay in args.layouts))
        row["torch_best_block_img_s"] = max(max(block_rates[f"torch_{lay}"]) for lay in args.layouts)
        row["ratio_best_blocks"] = row["jaxtl_best_block_img_s"] / row["torch_best_block_img_s"]
        if cpu_peak is not None:  # the same model FLOPs per step (XLA's count of the equivalent jaxtl step)
            row["torch_mfu"] = jx.flops * row["torch_img_s"] / args.batch / 1e12 / cpu_peak["peak"]
        for lay in args.layouts:
            row[f"torch_{lay}_img_s"] = per_layout[lay]
            row[f"torch_{lay}_loss"] = losses[f"torch_{lay}"]
            row[f"torch_{lay}_block_img_s"] = block_rates[f"torch_{lay}"]
    row["loadavg_1m_end"] = _load()
    for c in contestants.values():
        if isinstance(c, WorkerJaxtl):
            c.close()
    del contestants, jx
    return row


def _load() -> float | None:
    """1-minute load average (other processes competing for the cores make every figure noisier)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def env_info(args: argparse.Namespace, use_torch: bool) -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import optax

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
        "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
        "n_devices": jax.device_count(), "cpu_count": os.cpu_count(), "cpu": _cpu_model(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "parallel": args.parallel,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:],
        "rss_peak_method": "VmHWM+clear_refs" if PeakRSS._try_reset() else "psutil sampling",
    }
    if use_torch:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_mkldnn=bool(torch.backends.mkldnn.is_available()))
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(x: Any, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return format(x, spec)


def print_table(rows: list[dict[str, Any]], accel: bool, out: Any = sys.stdout) -> None:
    if accel:
        head = ["phase", "precision", "jaxtl img/s", "step ms", "GFLOP/step", "TFLOP/s", "MFU", "dev peak MiB",
                "host RSS MiB"]
        lines = [[r["phase"], r["precision"], _fmt(r["jaxtl_img_s"]), _fmt(r["jaxtl_step_ms"]),
                  _fmt(r["jaxtl_gflop_per_step"]), _fmt(r["jaxtl_tflop_s"], ".2f"),
                  _fmt(r.get("mfu"), ".1%"), _fmt(r.get("device_peak_mb"), ".0f"),
                  _fmt(r["jaxtl_peak_rss_mb"], ".0f")] for r in rows]
    else:
        head = ["phase", "precision", "jaxtl img/s", "torch img/s (best)", "nchw", "ch_last", "ratio",
                "ratio best blocks", "GFLOP/step", "peak TFLOP/s", "jaxtl MFU", "torch MFU", "jaxtl RSS MiB",
                "torch RSS MiB", "XLA step MiB", "compile s", "load"]
        lines = [[r["phase"], r["precision"], _fmt(r["jaxtl_img_s"], ".2f"),
                  _fmt(r.get("torch_img_s"), ".2f") + (f" ({r['torch_layout']})" if "torch_layout" in r else ""),
                  _fmt(r.get("torch_nchw_img_s"), ".2f"), _fmt(r.get("torch_channels_last_img_s"), ".2f"),
                  _fmt(r.get("ratio"), ".2f"), _fmt(r.get("ratio_best_blocks"), ".2f"),
                  _fmt(r["jaxtl_gflop_per_step"]), _fmt(r.get("peak_tflops_per_device"), ".3f"),
                  _fmt(r.get("mfu"), ".1%"), _fmt(r.get("torch_mfu"), ".1%"),
                  _fmt(r["jaxtl_peak_rss_mb"], ".0f"), _fmt(r.get("torch_peak_rss_mb"), ".0f"),
                  _fmt(r["jaxtl_xla_mem_mb"], ".0f"), _fmt(r["jaxtl_compile_s"]),
                  _fmt(r.get("loadavg_1m_end"), ".1f")] for r in rows]
    _print_columns(head, lines, out)
    var_lines = [[r["phase"], r["precision"], name, _fmt(v["img_s"], ".2f"), _fmt(v["best_block_img_s"], ".2f"),
                  _fmt(v["vs_first"], ".2f"), _fmt(v["ratio"], ".2f"), _fmt(v["peak_rss_mb"], ".0f"),
                  _fmt(v["compile_s"]), v["xla_flags"] or "-"]
                 for r in rows for name, v in r.get("variants", {}).items()]
    if var_lines:
        print(file=out)
        _print_columns(["phase", "precision", "variant", "jaxtl img/s", "best block", "vs first", "vs torch",
                        "RSS MiB", "compile s", "XLA_FLAGS"], var_lines, out)


def _print_columns(head: list[str], lines: list[list[str]], out: Any) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)), file=out)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Top-level JSON figures: the unfrozen float32 row, and frozen_no_bn float32 against it."""
    def find(phase: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["phase"] == phase and r["precision"] == "float32"), None)

    un, fz = find("unfrozen"), find("frozen_no_bn")
    out: dict[str, Any] = {"jaxtl_img_s": un and un["jaxtl_img_s"], "torch_img_s": un and un.get("torch_img_s"),
                           "ratio": un and un.get("ratio"), "frozen_no_bn_img_s": fz and fz["jaxtl_img_s"]}
    out["frozen_no_bn_vs_unfrozen"] = (fz["jaxtl_img_s"] / un["jaxtl_img_s"]) if un and fz else None
    out["ratio_best_blocks"] = un and un.get("ratio_best_blocks")
    for key in ("mfu", "torch_mfu", "peak_tflops_per_device"):
        if un and key in un:
            out[key] = un[key]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet34", choices=ARCHS)
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per contestant (default 5 on CPU, 50 on an accelerator)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation (default 2 / 10)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing blocks the steps are split into")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds of idle before each timed block")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: float32,bfloat16")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="torch layouts: nchw,channels_last")
    ap.add_argument("--no-torch", action="store_true", help="time jaxtl alone")
    ap.add_argument("--parallel", default="jit", choices=("jit", "pmap"), help="jaxtl DataParallel mode")
    ap.add_argument("--kernels", default="auto",
                    help="model.kernels: auto | plain | cpu, or for A/B a CPU set without one change: "
                         "cpu-no_barrier, cpu-no_phase_dx, cpu-no_max_pool (jaxtl/models/kernels.py)")
    ap.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before JAX starts")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=XLA_FLAGS",
                    help="repeatable: run jaxtl once per variant, each in its own process under these extra "
                         "XLA_FLAGS ('NAME=' for none), lock-stepped with the others and torch; the first "
                         "variant fills the jaxtl_* fields")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cpu-devices", type=int, default=0, help="jax_num_cpu_devices (0 = JAX's default)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (overrides the table)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.layouts = [p for p in args.layouts.split(",") if p]
    if args._worker is not None:
        return args
    bad_variants = [v for v in args.variant if "=" not in v]
    if bad_variants:
        ap.error(f"--variant takes NAME=XLA_FLAGS, got {bad_variants}")
    args.variant = [tuple(v.split("=", 1)) for v in args.variant]
    for name, vals, ok in (("--phases", args.phases, PHASES), ("--precisions", args.precisions, PRECISIONS),
                           ("--layouts", args.layouts, LAYOUTS)):
        bad = [v for v in vals if v not in ok]
        if bad or not vals:
            ap.error(f"{name}: {bad or 'empty'} not in {list(ok)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args._worker is not None:
        worker_main(args._worker)
        return {}
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    os.environ["JAXTL_BENCH_USER_XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")  # variants start from these
    import jax

    from jaxtl.cpu_defaults import apply_cpu_defaults

    apply_cpu_defaults()  # before JAX starts its backend (jaxtl/cpu_defaults.py)

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    accel = jax.default_backend() != "cpu"
    args.steps = args.steps if args.steps is not None else (50 if accel else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if accel else 2)
    use_torch = not (args.no_torch or accel)
    if use_torch:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    log(f"bench_train: {args.arch} {args.size}px batch {args.batch} on {jax.default_backend()} "
        f"({jax.device_count()} device(s)); torch reference: {'yes' if use_torch else 'no'}")
    peak = PeakRSS()
    cpu_peaks = {prec: None if accel else measure_cpu_peak(prec, use_torch) for prec in args.precisions}
    for prec, cp in cpu_peaks.items():
        if cp is not None:
            log(f"  CPU matmul peak ({prec}, measured now): " + ", ".join(f"{k} {v:.3f}" for k, v in cp.items())
                + " TFLOP/s")
    rows = [bench_row(args, phase, prec, peak, use_torch, log, cpu_peaks[prec])
            for prec in args.precisions for phase in args.phases]
    print_table(rows, accel)
    result = {**summary(rows), "rows": rows, "env": env_info(args, use_torch)}
    s = result
    if s["jaxtl_img_s"] is not None:
        msg = f"unfrozen float32: jaxtl {s['jaxtl_img_s']:.2f} img/s"
        if s["torch_img_s"] is not None:
            msg += (f", torch best {s['torch_img_s']:.2f} img/s, ratio {s['ratio']:.2f} (target >= 1.0; "
                    f"fastest blocks only: {s['ratio_best_blocks']:.2f})")
        print(msg)
    if s["frozen_no_bn_vs_unfrozen"] is not None:
        print(f"frozen (train_bn=False) vs unfrozen, jaxtl float32: {s['frozen_no_bn_vs_unfrozen']:.2f}x "
              "(target >= 2.5)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
