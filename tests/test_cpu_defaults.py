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


def test_import_applies_the_flag_before_the_backend_starts_and_xla_accepts_it():
    code = ("import jax, jaxtl, os, jaxtl.cpu_defaults as c\n"
            "expected = c.cpu_default_flags({}) \n"  # what this jaxlib gets
            "assert jax.numpy.ones(3).sum() == 3\n"  # the backend starts with the flags (XLA aborts on bad ones)
            "import json; print(json.dumps([os.environ.get('XLA_FLAGS', ''), expected]))")
    flags, expected = json.loads(_run(code))
    assert (expected in flags) if expected else flags == ""
    keep = _run("import jaxtl, os; print(os.environ['XLA_FLAGS'])",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert keep.startswith("--xla_force_host_platform_device_count=2")


def test_not_applied_once_the_backend_exists():
    code = "import jax; jax.devices(); import jaxtl, os; print(repr(os.environ.get('XLA_FLAGS', '')))"
    assert eval(_run(code)) == ""
