"""8-device sharded fits equal the single-device fit (subprocess with 8 host CPU devices)."""

from tests.helpers import run_on_8_cpu_devices


def test_sharded_fit_equals_single_device():
    proc = run_on_8_cpu_devices("_pre_multidevice_script.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
