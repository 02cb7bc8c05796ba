"""Batch norm over 8 (host) devices equals the single-device full-batch result.

JAX fixes the device count at start-up, so the checks run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/_bn_multidevice_script.py).
"""

import pytest

from tests.helpers import run_on_8_cpu_devices


@pytest.mark.slow
def test_eight_devices_equal_one():
    proc = run_on_8_cpu_devices("_bn_multidevice_script.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout, proc.stdout
