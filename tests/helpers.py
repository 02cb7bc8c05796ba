"""Shared test helpers: per-dtype tolerances and dtype lists."""

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# rtol/atol for comparing a computation done in `dtype` with a float64 reference.
_TOLERANCES = {
    np.dtype(jnp.float64): (1e-12, 1e-12),
    np.dtype(jnp.float32): (1e-5, 1e-6),
    np.dtype(jnp.float16): (2e-3, 1e-3),
    np.dtype(jnp.bfloat16): (1.6e-2, 1e-2),
}


def tol(dtype, scale: float = 1.0) -> dict:
    """Keyword arguments ``rtol``/``atol`` for np.testing.assert_allclose at ``dtype``."""
    rtol, atol = _TOLERANCES[np.dtype(dtype)]
    return {"rtol": rtol * scale, "atol": atol * scale}


def to_f64(x) -> np.ndarray:
    """A NumPy float64 copy of x, exact for every float dtype (bfloat16 included)."""
    x = np.asarray(x)
    if x.dtype == jnp.bfloat16:  # NumPy cannot cast bfloat16 to float64 directly
        x = x.astype(np.float32)
    return x.astype(np.float64)
