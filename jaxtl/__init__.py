"""jaxtl: fastai-style transfer learning in pure JAX (Flax ResNets, optax, tf.data, orbax)."""

import os

from jaxtl.cpu_defaults import apply_cpu_defaults

# TensorFlow is only the input pipeline here: keep its C++ start-up chatter (oneDNN, CPU features) off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# before JAX creates its backend: XLA reads XLA_FLAGS once (jaxtl/cpu_defaults.py says which flags and why)
apply_cpu_defaults()

__version__ = "0.1.0"
