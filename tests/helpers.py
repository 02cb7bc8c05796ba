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


def run_on_8_cpu_devices(script: str, *, timeout: int = 600):
    """Run ``tests/<script>`` in a subprocess that sees 8 host CPU devices.

    The device count is fixed when JAX starts, so multi-device tests run their checks in a fresh
    interpreter. Returns the ``subprocess.CompletedProcess`` (stdout and stderr as text).
    """
    import os
    import pathlib
    import subprocess
    import sys

    here = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here.parent), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(here / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
