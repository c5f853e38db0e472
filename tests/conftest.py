"""The test session is an entry point like ``jaxtl.main``: it applies jaxtl's XLA CPU flags before JAX starts its
backend (``import jaxtl`` itself changes nothing); subprocesses the tests start inherit them."""

from jaxtl.cpu_defaults import apply_cpu_defaults

apply_cpu_defaults()
