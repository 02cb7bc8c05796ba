"""The gradient checker's power: planted gradient errors are found, correct functions pass.

The battery lives in benchmarks/gradcheck_battery.py, which the power benchmark also runs
(benchmarks/results/cpu-gradcheck-power.md). Every planted error is in a custom backward pass (or
a stop_gradient misuse), so the finite difference of the forward pass is the independent reference.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import gradcheck_battery as battery
from jaxnorm import gradcheck


def _run(case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = battery.run_jaxnorm(case)
    return report, [w for w in caught if issubclass(w.category, Warning)]


@pytest.mark.parametrize("case", battery.PLANTED, ids=lambda c: c.name)
def test_planted_error_is_detected(case):
    report, caught = _run(case)
    if case.detectable:
        assert not report.passed, str(report)
        assert all(not c.kink for leaf in report.leaves for c in leaf.worst if c.failed)
    for w in caught:  # only the low-precision note, where f computes in bfloat16
        assert issubclass(w.category, gradcheck.LowPrecisionWarning), str(w.message)


def _correct_cases():
    for case in battery.CORRECT:
        # flax's Dense promotes its parameters' dtypes itself: not under strict promotion.
        marks = [pytest.mark.loose_promotion] if "flax" in case.name else []
        yield pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", list(_correct_cases()))
def test_correct_function_passes(case):
    report, caught = _run(case)
    assert report.passed, str(report)
    low = [w for w in caught if issubclass(w.category, gradcheck.LowPrecisionWarning)]
    assert len(low) == len(caught), [str(w.message) for w in caught]
    if case.low_precision:
        assert low and all(case.low_precision in str(w.message) for w in low)
        assert issubclass(gradcheck.LowPrecisionWarning, RuntimeWarning)
        assert all(leaf.precision == case.low_precision for leaf in report.leaves)
    else:
        assert not low


def test_battery_sizes():
    # The list: each kind of planted error and of correct function is in the battery.
    names = " ".join(c.name for c in battery.CASES)
    for word in (
        "1e-2",
        "1e-3",
        "1e-6 (float64)",
        "10,000",
        "sign",
        "kink",
        "bfloat16",
        "exp(20x) grad +1e-4",
        "relu at 0",
        "abs at 0",
        "maximum",
        "Hilbert",
        "deep tanh",
        "softmax cross-entropy",
        "batch norm",
    ):
        assert word in names, word
    assert len(battery.PLANTED) >= 15 and len(battery.CORRECT) >= 25


# ---------------------------------------------------------------------------------------------
# What the battery relies on, one mechanism at a time


def _exp20_vjp(rel):
    f = lambda x: jnp.sum(jnp.exp(20 * x))
    return battery.scaled_grad(f, 1 + rel) if rel else f


def test_fast_growing_error_is_not_excused_as_a_kink():
    # At x >= 2 the one-sided differences of exp(20x) differ by 20 h ~ 2e-4 relative: the old
    # rule took a 1e-4 error lying between them for a kink. Halving the step twice shows they
    # shrink with h (no kink), and Richardson's extrapolation resolves the derivative to ~1e-12.
    with jax.enable_x64(True):
        x = jnp.asarray([2.0, 2.5, 3.0, -3.0], jnp.float64)
        bad = gradcheck.check_grad(_exp20_vjp(1e-4), x)
        good = gradcheck.check_grad(_exp20_vjp(0.0), x)
    leaf = bad["arg0"]
    assert not bad.passed and leaf.num_kinks == 0
    # exp(-60) is ~1e-26: its 1e-4 error is far below atol, so three of four fail.
    assert leaf.num_failed == 3
    assert good.passed and good["arg0"].num_kinks == 0, str(good)
    x = np.asarray(x)
    for c in good["arg0"].worst:
        np.testing.assert_allclose(c.numeric, 20 * np.exp(20 * x[c.index]), rtol=1e-7)


def test_sum_of_terms_of_very_different_size_passes():
    # sum(exp(20 x)) over x in [-1, 1.5] is ~1e13, its smallest terms' gradients ~4e-8: the
    # difference f(x+h) - f(x-h) cancelled to noise; the change is now followed exactly.
    x = jnp.asarray(np.linspace(-1.0, 1.5, 11), jnp.float32)
    report = gradcheck.check_grad(_exp20_vjp(0.0), x)
    assert report.passed, str(report)
    g = gradcheck.numerical_grad(_exp20_vjp(0.0), x)
    np.testing.assert_allclose(g, 20 * np.exp(20 * np.asarray(x, np.float64)), rtol=1e-8)


def test_kink_values_outside_the_one_sided_range_fail_and_subgradients_pass():
    x = jnp.asarray([0.0, 0.5, -0.5, 1e-7, -1e-7], jnp.float32)
    for value, ok in ((0.0, True), (1.0, True), (0.5, True), (2.0, False), (-0.5, False)):
        relu = battery._relu_with_derivative_at_zero(value)
        report = gradcheck.check_grad(lambda x, relu=relu: jnp.sum(relu(x) * 1.5), x)
        assert report.passed == ok, (value, str(report))
        leaf = report["arg0"]
        # +-1e-7 (inside the step h ~ 6e-6) are kinks too; the wrong value fails at 0, and
        # 0.5 (the centred difference itself) needs no excuse.
        assert leaf.num_failed == (0 if ok else 1)
        assert leaf.num_kinks == (2 if value in (0.5, 2.0, -0.5) else 3)
    # |x| at 0 has one-sided slopes -1 and 1; 0 (jax's) and both slopes are valid.
    assert gradcheck.check_grad(lambda x: jnp.sum(jnp.abs(x)), x).passed


def test_float32_model_rule_error_found_by_the_float64_evaluation():
    # A 1e-4 error is below float32's rtol (1e-3) in the caller's dtype, but the same rule on
    # float64 copies disagrees with the differences far beyond float64's rtol (1e-7).
    f = battery.scaled_grad(lambda x: jnp.sum(jnp.sin(x)), 1 + 1e-4)
    x = jnp.asarray([0.3, -1.2, 2.0], jnp.float32)
    report = gradcheck.check_grad(f, x)
    leaf = report["arg0"]
    assert not report.passed and leaf.num_failed == 3
    assert leaf.rtol == 1e-3 and leaf.rtol64 == 1e-7
    worst = leaf.worst[0]
    np.testing.assert_allclose(
        worst.analytic64, (1 + 1e-4) * np.cos(np.float64(x[worst.index])), rtol=1e-12
    )
    assert "float64" in str(report)
    # An explicit tolerance holds for both checks.
    assert gradcheck.check_grad(f, x, rtol=1e-3).passed


def test_bfloat16_inside_f_warns_and_passes_and_the_differences_are_exact():
    x = jnp.asarray(np.linspace(-2.5, 2.5, 9), jnp.float32)
    f = lambda x: jnp.sum(jnp.sin(x.astype(jnp.bfloat16)).astype(jnp.float32))
    with pytest.warns(gradcheck.LowPrecisionWarning, match="computed through bfloat16"):
        report = gradcheck.check_grad(f, x)
    assert report.passed and report["arg0"].precision == "bfloat16", str(report)
    assert report["arg0"].rtol == 5e-2
    # The differences take f with its bfloat16 steps widened: the derivative of sin itself.
    g = gradcheck.numerical_grad(f, x)
    np.testing.assert_allclose(g, np.cos(np.asarray(x, np.float64)), rtol=1e-8, atol=1e-10)


def test_low_precision_inside_a_loop_limits_the_differences_and_says_so():
    def f(x):
        def body(c, _):
            return (c * 0.9 + jnp.sin(c)).astype(jnp.bfloat16).astype(c.dtype), None

        return jnp.sum(jax.lax.scan(body, x, None, length=2)[0])

    with pytest.warns(gradcheck.LowPrecisionWarning, match="only as precise as bfloat16"):
        gradcheck.numerical_grad(f, jnp.asarray([0.3, 0.7], jnp.float32))
