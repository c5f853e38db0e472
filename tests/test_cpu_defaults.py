"""jaxtl's default XLA CPU flag: when it is added to XLA_FLAGS, when it is not, and that XLA accepts it."""

import json
import os
import subprocess
import sys

from jaxtl.cpu_defaults import YNN_FLAG, cpu_default_flags


def test_flag_added_for_measured_jaxlib():
    assert cpu_default_flags({}, "0.10.2") == YNN_FLAG
    assert cpu_default_flags({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, "0.10.0") == YNN_FLAG


def test_flag_not_added_when_opted_out_overridden_or_unknown_version():
    assert cpu_default_flags({"JAXTL_CPU_DEFAULTS": "0"}, "0.10.2") == ""
    assert cpu_default_flags({"JAXTL_CPU_DEFAULTS": "off"}, "0.10.2") == ""
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert cpu_default_flags(user, "0.10.2") == ""  # the user's own setting wins
    assert cpu_default_flags({}, "0.11.0") == ""  # XLA aborts on unknown flags: only versions measured
    assert cpu_default_flags({}, "0.9.1") == ""


def _run(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXTL_CPU_DEFAULTS")}
    full.update(env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_apply_adds_the_flag_before_the_backend_starts_and_xla_accepts_it():
    code = ("import jax, os, jaxtl.cpu_defaults as c\n"
            "expected = c.cpu_default_flags({})\n"  # what this jaxlib gets
            "c.apply_cpu_defaults()\n"
            "assert jax.numpy.ones(3).sum() == 3\n"  # the backend starts with the flags (XLA aborts on bad ones)
            "import json; print(json.dumps([os.environ.get('XLA_FLAGS', ''), expected]))")
    flags, expected = json.loads(_run(code))
    assert (expected in flags) if expected else flags == ""
    keep = _run("import jaxtl.cpu_defaults as c, os; c.apply_cpu_defaults(); print(os.environ['XLA_FLAGS'])",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert keep.startswith("--xla_force_host_platform_device_count=2")


def test_not_applied_once_the_backend_exists():
    code = ("import jax; jax.devices(); import jaxtl.cpu_defaults as c, os; c.apply_cpu_defaults(); "
            "print(repr(os.environ.get('XLA_FLAGS', '')))")
    assert eval(_run(code)) == ""


def test_importing_jaxtl_leaves_the_environment_and_jax_config_unchanged():
    """No side effects on import: os.environ and JAX's configuration are as before importing every jaxtl module
    a user touches (the CLI's included); jaxtl.main's main() is what applies the CPU defaults."""
    code = ("import os, json, jax\n"
            "before_env = dict(os.environ)\n"
            "before_cfg = {k: str(v) for k, v in jax.config.values.items()}\n"
            "import jaxtl, jaxtl.models, jaxtl.train, jaxtl.learner, jaxtl.optim, jaxtl.parallel, jaxtl.main\n"
            "import jaxtl.predict, jaxtl.convert, jaxtl.run_setup, jaxtl.cpu_defaults, jaxtl.models.kernels\n"
            "after_cfg = {k: str(v) for k, v in jax.config.values.items()}\n"
            "print(json.dumps([sorted(set(os.environ.items()) ^ set(before_env.items())),\n"
            "                  sorted(k for k in after_cfg if after_cfg[k] != before_cfg.get(k))]))")
    env_diff, cfg_diff = json.loads(_run(code))
    assert env_diff == [] and cfg_diff == []
