"""jaxnorm: "Training Neural Networks, Part 1" as a JAX library.

Pure functions that run under ``jit``, ``vmap`` and ``grad`` (activations, initializers,
preprocessing, regularization, batch norm, gradient checking, diagnostics) and thin Flax modules
over them (``jaxnorm.nn`` for linen, ``jaxnorm.nnx`` for nnx). The modules that need flax, optax or
matplotlib (``nn``, ``nnx``, ``training``, ``lab``) are imported on first use, so that
``import jaxnorm`` stays light.

>>> import jax.numpy as jnp
>>> import jaxnorm as jn
>>> jn.relu(jnp.array([-1.0, 2.0]))
Array([0., 2.], dtype=float32)
"""

import importlib

from jaxnorm import (
    activations,
    batchnorm,
    data,
    diagnostics,
    gradcheck,
    initializers,
    preprocessing,
    regularization,
)
from jaxnorm.activations import (
    elu,
    gelu,
    leaky_relu,
    maxout,
    prelu,
    relu,
    selu,
    sigmoid,
    silu,
    softplus,
    tanh,
)
from jaxnorm.batchnorm import BatchNormState, batch_norm
from jaxnorm.gradcheck import GradCheckReport, check_grad, numerical_grad, relative_error

__version__ = "0.1.0"

__all__ = [
    "BatchNormState",
    "GradCheckReport",
    "activations",
    "batch_norm",
    "batchnorm",
    "check_grad",
    "data",
    "diagnostics",
    "elu",
    "gelu",
    "gradcheck",
    "initializers",
    "lab",
    "leaky_relu",
    "maxout",
    "nn",
    "nnx",
    "numerical_grad",
    "prelu",
    "preprocessing",
    "regularization",
    "relative_error",
    "relu",
    "selu",
    "sigmoid",
    "silu",
    "softplus",
    "tanh",
    "training",
]

_LAZY = ("lab", "nn", "nnx", "training")


def __getattr__(name):
    # These import flax, optax or matplotlib (a second or more); load them when first touched.
    if name in _LAZY:
        module = importlib.import_module(f"jaxnorm.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jaxnorm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
