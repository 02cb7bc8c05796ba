"""jaxnorm as a drop-in for jax.nn: the cases of jax's own ``tests/nn_test.py`` (jax-v0.10.2).

jax's test file is run against jaxnorm by ``tools/peer_suites`` (results in docs/peer_suites.md);
these are jaxnorm's own tests of the same promises, written without the fetched code: every
initializer jaxnorm shares with ``jax.nn.initializers`` takes jax's calls (positional ``dtype``,
factory ``dtype=``, legacy ``PRNGKey`` keys, ``dtype=None``, ``out_sharding``) for every shape and
dtype jax's file tries, complex ones included, and returns what jax.nn returns; ``orthogonal``
returns empty arrays for zero-size shapes; the shared activations keep jax.nn's signatures, dtypes
and values. The references are jax.nn itself, NumPy and SciPy; where jaxnorm differs on purpose
(untruncated normals, exact gelu, the complex truncated normal's variance) the test says so.
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jaxnorm
from jaxnorm import initializers as ini
from tests.helpers import to_f64

JI = jax.nn.initializers
LEGACY_KEY = jax.random.PRNGKey(0)  # the raw uint32 key jax's tests use

# The names jaxnorm shares with jax.nn.initializers (the substitution's table in tools/peer_suites).
SHARED_INITIALIZERS = (
    "he_normal",
    "he_uniform",
    "lecun_normal",
    "lecun_uniform",
    "xavier_normal",
    "xavier_uniform",
)
SHARED_ACTIVATIONS = (
    "elu",
    "gelu",
    "leaky_relu",
    "relu",
    "selu",
    "sigmoid",
    "silu",
    "softplus",
    "tanh",
)

# nn_test's ALL_SHAPES with 2 to 4 dimensions, and its dtypes on a CPU without x64:
# jtu.dtypes.floating and jtu.dtypes.inexact.
KERNEL_SHAPES = [(2, 2), (2, 3), (3, 2), (2, 3, 4), (4, 3, 2), (2, 3, 4, 5)]
FLOATING = [jnp.bfloat16, jnp.float16, jnp.float32]
INEXACT = [*FLOATING, jnp.complex64]


def _same_shape_and_dtype(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype


# ------------------------------------------------------------------------------------------
# Initializers: jax's calls, jax's shapes and dtypes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", INEXACT, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", SHARED_INITIALIZERS)
def test_initializer_calls_as_jax_nn(name, dtype):
    # nn_test's testInitializer and testInitializerProvider: init(key, shape, dtype) and
    # factory(dtype=dtype)(key, shape), with a legacy key. Both calls run for the first shape;
    # for the others jax.eval_shape traces the same calls (every check jaxnorm makes of its
    # arguments runs) without compiling one random program per shape (the values are compared
    # with jax.nn's in test_initializers.py).
    for i, shape in enumerate(KERNEL_SHAPES):
        abstract = i > 0
        theirs = _call(getattr(JI, name)(), LEGACY_KEY, shape, dtype, abstract=abstract)
        ours = _call(getattr(ini, name)(), LEGACY_KEY, shape, dtype, abstract=abstract)
        _same_shape_and_dtype(ours, theirs)
        ours = _call(getattr(ini, name)(dtype=dtype), LEGACY_KEY, shape, abstract=abstract)
        _same_shape_and_dtype(ours, theirs)


def _call(init, key, *rest, abstract):
    """``init(key, *rest)``, or only its shape and dtype (jax.eval_shape: traced, not compiled)."""
    if abstract:
        return jax.eval_shape(lambda k: init(k, *rest), key)
    return init(key, *rest)


# jax.nn's orthogonal runs QR in the requested dtype, which LAPACK (CPU) lacks for float16 and
# bfloat16; jaxnorm draws in float32 and rounds once, so it is compared with jax.nn's numbers in
# float32 and complex64 only.
JAX_QR_DTYPES = (jnp.float32, jnp.complex64)


@pytest.mark.parametrize("dtype", INEXACT, ids=lambda d: jnp.dtype(d).name)
def test_orthogonal_calls_as_jax_nn(dtype):
    for shape in [(2, 2), (2, 3), (3, 2)]:
        w = ini.orthogonal()(LEGACY_KEY, shape, dtype)
        assert w.shape == shape and w.dtype == dtype
        _same_shape_and_dtype(ini.orthogonal(dtype=dtype)(LEGACY_KEY, shape), w)
        if dtype in JAX_QR_DTYPES:
            theirs = JI.orthogonal()(LEGACY_KEY, shape, dtype)
            np.testing.assert_array_equal(np.asarray(w), np.asarray(theirs))


@pytest.mark.parametrize("dtype", [*FLOATING, jnp.complex64], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("rows", range(4))
@pytest.mark.parametrize("cols", range(4))
def test_orthogonal_zero_size_as_jax_nn(rows, cols, dtype):
    # nn_test's testInitializerOrthogonalZeroSize: an empty array where a dimension is 0, and
    # orthonormal rows or columns otherwise (W W^H = I, W^H W = I: eye(0) for an empty matrix).
    w = ini.orthogonal()(LEGACY_KEY, (rows, cols), dtype)
    assert w.shape == (rows, cols) and w.dtype == dtype
    if dtype in JAX_QR_DTYPES or rows * cols == 0:
        theirs = JI.orthogonal()(LEGACY_KEY, (rows, cols), dtype)
        np.testing.assert_array_equal(np.asarray(w), np.asarray(theirs))  # the same numbers
    m = to_f64(w) if dtype == jnp.bfloat16 else np.asarray(w).astype(np.complex128)
    atol = {jnp.float32: 1e-6, jnp.complex64: 1e-6, jnp.float16: 3e-3, jnp.bfloat16: 2e-2}[dtype]
    if rows <= cols:
        np.testing.assert_allclose(m @ m.conj().T, np.eye(rows), atol=atol)
    if cols <= rows:
        np.testing.assert_allclose(m.conj().T @ m, np.eye(cols), atol=atol)


@pytest.mark.parametrize("name", SHARED_INITIALIZERS)
def test_zero_size_kernels_are_empty_where_jax_nn_divides_by_zero(name):
    # A documented difference in jaxnorm's favour: jax.nn's variance scaling divides by the fan.
    for shape in [(0, 4), (4, 0), (3, 3, 0, 8)]:
        w = getattr(ini, name)()(LEGACY_KEY, shape, jnp.float32)
        assert w.shape == shape and w.dtype == jnp.float32
        with pytest.raises(ZeroDivisionError):
            getattr(JI, name)()(LEGACY_KEY, shape, jnp.float32)


# ------------------------------------------------------------------------------------------
# Initializers: complex numbers and statistics
# ------------------------------------------------------------------------------------------

# jaxnorm name -> jax.nn initializer with the same complex64 numbers (same key, eager).
SAME_COMPLEX_NUMBERS = {
    "he_uniform": JI.he_uniform(),
    "lecun_uniform": JI.lecun_uniform(),
    "xavier_uniform": JI.xavier_uniform(),
    # jaxnorm's *_normal presets are untruncated: jax.nn's "normal" variance scaling.
    "he_normal": JI.variance_scaling(2.0, "fan_in", "normal"),
    "lecun_normal": JI.variance_scaling(1.0, "fan_in", "normal"),
    "xavier_normal": JI.variance_scaling(1.0, "fan_avg", "normal"),
}


@pytest.mark.parametrize("name", list(SAME_COMPLEX_NUMBERS))
def test_complex_numbers_are_jax_nns(name):
    for shape in [(64, 32), (3, 3, 4, 8)]:
        np.testing.assert_array_equal(
            np.asarray(getattr(ini, name)()(LEGACY_KEY, shape, jnp.complex64)),
            np.asarray(SAME_COMPLEX_NUMBERS[name](LEGACY_KEY, shape, jnp.complex64)),
        )


@pytest.mark.parametrize("name", SHARED_INITIALIZERS)
def test_complex_second_moment_is_the_real_laws_variance(name):
    # jax.nn's convention for complex weights: E|w|^2 is the variance the real law has, split
    # equally between the real and imaginary parts. Fans of (512, 256) by hand.
    variance = {"he": 2 / 512, "lecun": 1 / 512, "xavier": 2 / (512 + 256)}[name.split("_")[0]]
    z = np.asarray(getattr(ini, name)()(jax.random.key(3), (512, 256), jnp.complex64))
    z = z.astype(np.complex128).ravel()
    n = z.size
    np.testing.assert_allclose(np.mean(np.abs(z) ** 2), variance, rtol=6 / math.sqrt(n))
    np.testing.assert_allclose(z.real.var(), variance / 2, rtol=6 * math.sqrt(2 / n))
    np.testing.assert_allclose(z.imag.var(), variance / 2, rtol=6 * math.sqrt(2 / n))


def test_orthogonal_complex_is_unitary_like_jax_nn():
    w = np.asarray(ini.orthogonal(2.0)(LEGACY_KEY, (12, 5), jnp.complex64)).astype(np.complex128)
    np.testing.assert_allclose(w.conj().T @ w, 4.0 * np.eye(5), atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(ini.orthogonal(2.0)(LEGACY_KEY, (12, 5), jnp.complex64)),
        np.asarray(JI.orthogonal(2.0)(LEGACY_KEY, (12, 5), jnp.complex64)),
    )


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
@pytest.mark.parametrize("name", [*SHARED_INITIALIZERS, "orthogonal"])
def test_integer_dtypes_are_refused_clearly(name, dtype):
    with pytest.raises(TypeError, match=rf"{name} draws floating-point weights.*real.*complex"):
        getattr(ini, name)()(LEGACY_KEY, (4, 3), dtype)


# ------------------------------------------------------------------------------------------
# Initializers: jax.nn's signature
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SHARED_INITIALIZERS, "orthogonal"])
def test_factories_take_jax_nns_keywords(name):
    ours = inspect.signature(getattr(ini, name)).parameters
    theirs = inspect.signature(getattr(JI, name)).parameters
    assert set(theirs) <= set(ours)
    # jax.nn's default arguments, given by keyword, build the same initializer.
    kwargs = {k: p.default for k, p in theirs.items()}
    w = getattr(ini, name)(**kwargs)(LEGACY_KEY, (4, 3, 2))
    assert w.shape == (4, 3, 2) and w.dtype == jnp.float32


@pytest.mark.parametrize("name", [*SHARED_INITIALIZERS, "orthogonal"])
def test_init_takes_jax_nns_arguments(name):
    # The Initializer protocol: init(key, shape, dtype=None, out_sharding=None).
    ours = list(inspect.signature(getattr(ini, name)()).parameters)
    theirs = list(inspect.signature(getattr(JI, name)()).parameters)
    assert ours == theirs == ["key", "shape", "dtype", "out_sharding"]
    assert isinstance(getattr(ini, name)(), JI.Initializer)


@pytest.mark.parametrize("name", [*SHARED_INITIALIZERS, "orthogonal"])
def test_dtype_none_as_jax_nn(name):
    shape = (4, 3)
    for x64 in (False, True):
        with jax.enable_x64(x64):
            theirs = getattr(JI, name)(dtype=None)(LEGACY_KEY, shape)
            assert getattr(ini, name)(dtype=None)(LEGACY_KEY, shape).dtype == theirs.dtype
            assert getattr(ini, name)(dtype=None)(LEGACY_KEY, shape, None).dtype == theirs.dtype


@pytest.mark.parametrize("name", [*SHARED_INITIALIZERS, "orthogonal"])
def test_out_sharding_as_jax_nn(name):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("x",))
    sharding = NamedSharding(mesh, P("x", None))
    w = getattr(ini, name)()(LEGACY_KEY, (4, 3), jnp.float32, out_sharding=sharding)
    assert w.sharding == sharding
    np.testing.assert_array_equal(
        np.asarray(w), np.asarray(getattr(ini, name)()(LEGACY_KEY, (4, 3), jnp.float32))
    )


# ------------------------------------------------------------------------------------------
# Activations: jax.nn's signatures, dtypes and values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHARED_ACTIVATIONS)
def test_activations_take_jax_nns_parameters(name):
    ours = inspect.signature(getattr(jaxnorm, name)).parameters
    theirs = inspect.signature(getattr(jax.nn, name)).parameters
    assert list(ours) == list(theirs)
    # The same defaults but gelu's (exact in jaxnorm, tanh in jax.nn: see docs/activations.md).
    for k, p in theirs.items():
        if name != "gelu":
            assert ours[k].default == p.default


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", SHARED_ACTIVATIONS)
def test_activation_dtype_matches_input(name, dtype):
    # nn_test's testDtypeMatchesInput.
    assert getattr(jaxnorm, name)(jnp.zeros((), dtype)).dtype == dtype
    if name == "gelu":
        assert jaxnorm.gelu(jnp.zeros((), dtype), approximate=True).dtype == dtype


GRID = jnp.linspace(-20, 20, 4001, dtype=jnp.float32)


@pytest.mark.parametrize("name", SHARED_ACTIVATIONS)
def test_activation_values_and_gradients_as_jax_nn(name):
    # Values agree with jax.nn within rtol 2e-5 (on this grid they are equal); gradients too, away
    # from the kinks at 0 whose conventions docs/activations.md states.
    kw = {"approximate": False} if name == "gelu" else {}
    ours, theirs = getattr(jaxnorm, name), lambda x: getattr(jax.nn, name)(x, **kw)
    np.testing.assert_allclose(to_f64(ours(GRID)), to_f64(theirs(GRID)), rtol=2e-5, atol=1e-30)
    x = GRID[GRID != 0]
    g_ours = jax.vmap(jax.grad(ours))(x)
    g_theirs = jax.vmap(jax.grad(theirs))(x)
    np.testing.assert_allclose(to_f64(g_ours), to_f64(g_theirs), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_against_scipy_as_jax_nn_tests_it(approximate):
    # nn_test's testGelu: x * Phi(x) on [-12, 5], rtol 2e-5 (atol 1e-3 for the tanh form).
    x = np.linspace(-12, 5, 10000, dtype=np.float32)
    ref = x.astype(np.float64) * scipy.stats.norm.cdf(x.astype(np.float64))
    got = to_f64(jaxnorm.gelu(jnp.asarray(x), approximate=approximate))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-3 if approximate else 0)


def test_activation_edge_values_as_jax_nn():
    # nn_test's testReluGradAtZero, testSoftplusValue, testEluValue, testSoftplusGradInf.
    assert float(jax.grad(jaxnorm.relu)(0.0)) == 0.0
    np.testing.assert_allclose(float(jaxnorm.softplus(89.0)), 89.0)
    np.testing.assert_allclose(float(jaxnorm.elu(1e4)), 1e4)
    assert float(jax.grad(jaxnorm.softplus)(float("inf"))) == 1.0
    assert float(jaxnorm.softplus(0.0)) == pytest.approx(math.log(2.0), rel=1e-7)
