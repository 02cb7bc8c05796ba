"""Batch norm over 8 (host) devices equals the single-device full-batch result.

JAX fixes the device count at start-up, so the checks run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/_bn_multidevice_script.py).
"""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_eight_devices_equal_one():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(here, "_bn_multidevice_script.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout, proc.stdout
