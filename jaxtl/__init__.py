"""jaxtl: fastai-style transfer learning in pure JAX (Flax ResNets, optax, tf.data, orbax).

Importing jaxtl changes nothing in the process (no environment variables, no JAX configuration). Entry points
(``jaxtl.main``, the benchmarks) call :func:`jaxtl.cpu_defaults.apply_cpu_defaults` before JAX starts its
backend; a notebook can do the same in its first cell.
"""

__version__ = "0.1.0"
