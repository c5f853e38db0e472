"""jaxtl: fastai-style transfer learning in pure JAX (Flax ResNets, optax, tf.data, orbax)."""

import os

# TensorFlow is only the input pipeline here: keep its C++ start-up chatter (oneDNN, CPU features) off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
