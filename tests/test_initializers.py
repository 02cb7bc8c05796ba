"""Tests for jaxnorm.initializers.

References are independent of the code under test: closed-form standard deviations and bounds in
NumPy float64 (fans written out by hand), jax.nn.initializers (same numbers for the same key where
jaxnorm claims it), torch.nn.init and torch layers, torch.nn.init.calculate_gain, and orthogonality
checked in float64. Tolerances on sample statistics come from the sample size (several standard
errors), so the tests are tight and cannot flake for these fixed keys.
"""

import math

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import initializers as ini
from tests.helpers import FLOAT_DTYPES, to_f64

KEY = jax.random.key(0)

# std of a standard normal truncated to (-2, 2), from its closed form (not jaxnorm's constant).
_PHI2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
_MASS2 = math.erf(2 / math.sqrt(2))
TRUNC_STD = math.sqrt(1 - 2 * 2 * _PHI2 / _MASS2)

# (shape, fan_in, fan_out) with the fans counted by hand in Flax's layout.
DENSE = ((512, 256), 512, 256)
CONV = ((3, 3, 64, 128), 3 * 3 * 64, 3 * 3 * 128)


def _std(family, fan_in, fan_out):
    return {
        "xavier": math.sqrt(2.0 / (fan_in + fan_out)),
        "he": math.sqrt(2.0 / fan_in),
        "lecun": math.sqrt(1.0 / fan_in),
        "torch_linear": 1.0 / math.sqrt(3.0 * fan_in),
    }[family]


# id -> (factory, family of the closed-form std, distribution)
CASES = {
    "xavier_normal": (ini.xavier_normal, "xavier", "normal"),
    "xavier_normal_truncated": (
        lambda **kw: ini.xavier_normal(truncated=True, **kw),
        "xavier",
        "truncated",
    ),
    "xavier_uniform": (ini.xavier_uniform, "xavier", "uniform"),
    "he_normal": (ini.he_normal, "he", "normal"),
    "he_normal_truncated": (lambda **kw: ini.he_normal(truncated=True, **kw), "he", "truncated"),
    "he_uniform": (ini.he_uniform, "he", "uniform"),
    "lecun_normal": (ini.lecun_normal, "lecun", "normal"),
    "lecun_normal_truncated": (
        lambda **kw: ini.lecun_normal(truncated=True, **kw),
        "lecun",
        "truncated",
    ),
    "lecun_uniform": (ini.lecun_uniform, "lecun", "uniform"),
    "torch_linear_default": (ini.torch_linear_default, "torch_linear", "uniform"),
}

# Every public factory, for the properties all of them share.
ALL_FACTORIES = {
    **{k: v[0] for k, v in CASES.items()},
    "small_normal": ini.small_normal,
    "orthogonal": ini.orthogonal,
    "torch_linear_bias_default": lambda **kw: ini.torch_linear_bias_default(64, **kw),
}
KERNEL_FACTORIES = {k: v for k, v in ALL_FACTORIES.items() if k not in ("small_normal",)}
KERNEL_FACTORIES.pop("torch_linear_bias_default")


def check_distribution(w, std, kind):
    """Sample mean, std and extremes of w against a zero-mean law with standard deviation std."""
    x = to_f64(w).ravel()
    n = x.size
    # Relative standard error of a sample std is sqrt((kurtosis - 1) / 4n); 3 (normal) bounds all.
    np.testing.assert_allclose(x.std(), std, rtol=6 * math.sqrt(2 / (4 * n)))
    assert abs(x.mean()) < 6 * std / math.sqrt(n)
    top = np.abs(x).max()
    if kind == "uniform":
        bound = math.sqrt(3) * std
        # P(max < bound (1 - 20/n)) is about exp(-20).
        assert bound * (1 - 20 / n) <= top <= bound * (1 + 1e-6)
    elif kind == "truncated":
        bound = 2 * std / TRUNC_STD
        assert 0.99 * bound <= top <= bound * (1 + 1e-6)
    else:
        # Beyond the truncated bound (2.27 std): a normal puts 1.2% of its samples past 2.5 std.
        assert n * 0.0124 > 20 and top > 2.5 * std
    return x


# ------------------------------------------------------------------------------------------
# Distributions against closed-form targets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("case", list(CASES))
def test_statistics_match_closed_form(case, layout):
    factory, family, kind = CASES[case]
    shape, fan_in, fan_out = layout
    w = factory()(KEY, shape)
    assert w.shape == shape and w.dtype == jnp.float32
    check_distribution(w, _std(family, fan_in, fan_out), kind)


def test_small_normal_is_the_lectures_naive_init():
    w = ini.small_normal()(KEY, (512, 256))
    check_distribution(w, 0.01, "normal")
    check_distribution(ini.small_normal(0.5)(KEY, (512, 256)), 0.5, "normal")


def test_small_normal_accepts_any_shape():
    init = ini.small_normal()
    assert init(KEY, ()).shape == ()
    assert init(KEY, (7,)).shape == (7,)
    assert init(KEY, (0, 3)).shape == (0, 3)


def test_options_gain_negative_slope_and_mode():
    shape, fan_in, fan_out = CONV
    g = 5.0 / 3.0
    check_distribution(
        ini.xavier_normal(gain=g)(KEY, shape), g * _std("xavier", fan_in, fan_out), "normal"
    )
    check_distribution(
        ini.xavier_uniform(gain=g)(KEY, shape), g * _std("xavier", fan_in, fan_out), "uniform"
    )
    check_distribution(ini.lecun_normal(gain=g)(KEY, shape), g / math.sqrt(fan_in), "normal")
    check_distribution(ini.lecun_uniform(gain=g)(KEY, shape), g / math.sqrt(fan_in), "uniform")
    a = 0.2
    check_distribution(
        ini.he_normal(negative_slope=a)(KEY, shape), math.sqrt(2 / (1 + a * a) / fan_in), "normal"
    )
    check_distribution(
        ini.he_uniform(negative_slope=a, mode="fan_out")(KEY, shape),
        math.sqrt(2 / (1 + a * a) / fan_out),
        "uniform",
    )
    check_distribution(ini.he_normal(mode="fan_out")(KEY, shape), math.sqrt(2 / fan_out), "normal")


def test_custom_axes_count_fans_like_jax():
    # (batch=4, out=32, receptive=5, in=64): fan_in = 64 * 5, fan_out = 32 * 5.
    shape = (4, 32, 5, 64)
    kw = {"in_axis": -1, "out_axis": 1, "batch_axis": 0}
    w = ini.xavier_uniform(**kw)(KEY, shape)
    check_distribution(w, math.sqrt(2 / (64 * 5 + 32 * 5)), "uniform")
    ref = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", **kw)(KEY, shape)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(ref))
    # Several input axes, in=(0, 2) and out=3: axis 1 is the receptive field, fan_in = 4 * 5 * 32.
    w = ini.lecun_normal(in_axis=(0, 2), out_axis=3)(KEY, shape)
    check_distribution(w, 1 / math.sqrt(4 * 5 * 32), "normal")


# ------------------------------------------------------------------------------------------
# Against jax.nn.initializers (same key, same numbers where jaxnorm says so)
# ------------------------------------------------------------------------------------------

# Every row of docs/initializers.md's table with a jax.nn equivalent, and the untruncated presets
# against variance_scaling(..., "normal"): the same float32 numbers, bit for bit.
JAX_EQUIVALENTS = {
    "small_normal": (ini.small_normal(), jax.nn.initializers.normal(0.01)),
    "small_normal_0.02": (ini.small_normal(0.02), jax.nn.initializers.normal(0.02)),
    "he_normal_truncated": (ini.he_normal(truncated=True), jax.nn.initializers.he_normal()),
    "lecun_normal_truncated": (
        ini.lecun_normal(truncated=True),
        jax.nn.initializers.lecun_normal(),
    ),
    "xavier_normal_truncated": (
        ini.xavier_normal(truncated=True),
        jax.nn.initializers.glorot_normal(),
    ),
    "he_uniform": (ini.he_uniform(), jax.nn.initializers.he_uniform()),
    "lecun_uniform": (ini.lecun_uniform(), jax.nn.initializers.lecun_uniform()),
    "xavier_uniform": (ini.xavier_uniform(), jax.nn.initializers.glorot_uniform()),
    "he_normal": (ini.he_normal(), jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")),
    "lecun_normal": (
        ini.lecun_normal(),
        jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
    ),
    "xavier_normal": (
        ini.xavier_normal(),
        jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal"),
    ),
    "torch_linear_default": (
        ini.torch_linear_default(),
        jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    ),
    # A gain g is jax.nn's scale g * g; He's slope a gives scale 2 / (1 + a^2).
    "xavier_normal_gain_truncated": (
        ini.xavier_normal(gain=5 / 3, truncated=True),
        jax.nn.initializers.variance_scaling((5 / 3) ** 2, "fan_avg", "truncated_normal"),
    ),
    "lecun_uniform_gain": (
        ini.lecun_uniform(gain=0.7),
        jax.nn.initializers.variance_scaling(0.7**2, "fan_in", "uniform"),
    ),
    "he_uniform_slope_fan_out": (
        ini.he_uniform(negative_slope=0.2, mode="fan_out"),
        jax.nn.initializers.variance_scaling(2 / (1 + 0.2**2), "fan_out", "uniform"),
    ),
    "orthogonal": (ini.orthogonal(), jax.nn.initializers.orthogonal()),
    "orthogonal_scale_column_axis_0": (
        ini.orthogonal(2.0, column_axis=0),
        jax.nn.initializers.orthogonal(2.0, column_axis=0),
    ),
}

# (300, 200) is the audit's shape (98% of xavier_normal(truncated=True)'s entries differed). Whether
# a float64 scale rounded once differs from jax.nn's float32 arithmetic depends on the fans, so
# several are tried; fan_in = 5 and fan_out = 14 catch torch_linear_default and he_uniform's slope.
EXACT_SHAPES = [(300, 200), (3, 3, 64, 128), (7, 5), (1000, 1), (5, 14)]


@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=str)
@pytest.mark.parametrize("case", list(JAX_EQUIVALENTS))
def test_bit_identical_to_jax_nn(case, shape):
    ours, theirs = JAX_EQUIVALENTS[case]
    for seed in (0, 1, 7):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(
            np.asarray(ours(key, shape)), np.asarray(theirs(key, shape, jnp.float32))
        )


def test_jax_nn_normal_presets_are_truncated_and_ours_are_not():
    shape, fan_in, _ = DENSE
    std = math.sqrt(2 / fan_in)
    check_distribution(jax.nn.initializers.he_normal()(KEY, shape), std, "truncated")
    check_distribution(ini.he_normal()(KEY, shape), std, "normal")


# ------------------------------------------------------------------------------------------
# Against torch.nn.init (layouts (out, in) and (out, in, H, W))
# ------------------------------------------------------------------------------------------


def _torch_sample(fill, shape, seed=0):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(shape, dtype=torch.float64)
    fill(t, g)
    return t.numpy()


def _same_std(ours, theirs):
    a, b = to_f64(ours).ravel(), np.asarray(theirs, np.float64).ravel()
    # Two independent sample stds: the standard error of the difference is sqrt(2) times one's.
    np.testing.assert_allclose(
        a.std(), b.std(), rtol=6 * math.sqrt(2) * math.sqrt(2 / (4 * a.size))
    )


def test_he_normal_matches_torch_kaiming_normal():
    torch = pytest.importorskip("torch")
    init = torch.nn.init
    # Conv2d(64 -> 128, 3x3): torch (128, 64, 3, 3), Flax (3, 3, 64, 128).
    t = _torch_sample(
        lambda t, g: init.kaiming_normal_(t, nonlinearity="relu", generator=g), (128, 64, 3, 3)
    )
    _same_std(ini.he_normal()(KEY, (3, 3, 64, 128)), t)
    t = _torch_sample(lambda t, g: init.kaiming_normal_(t, a=0.2, generator=g), (256, 512))
    _same_std(ini.he_normal(negative_slope=0.2)(KEY, (512, 256)), t)
    t = _torch_sample(
        lambda t, g: init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu", generator=g),
        (256, 512),
    )
    _same_std(ini.he_normal(mode="fan_out")(KEY, (512, 256)), t)
    # torch's kaiming_normal_ is untruncated, as ours.
    check_distribution(t, math.sqrt(2 / 256), "normal")


def test_xavier_matches_torch():
    torch = pytest.importorskip("torch")
    init = torch.nn.init
    g = init.calculate_gain("tanh")
    t = _torch_sample(lambda t, r: init.xavier_uniform_(t, gain=g, generator=r), (256, 512))
    w = to_f64(ini.xavier_uniform(gain=ini.gain("tanh"))(KEY, (512, 256)))
    # Both maxima sit within 20/n of their bound, so the bounds agree.
    np.testing.assert_allclose(np.abs(w).max(), np.abs(t).max(), rtol=40 / w.size)
    _same_std(w, t)
    t = _torch_sample(lambda t, r: init.xavier_normal_(t, generator=r), (128, 64, 3, 3))
    _same_std(ini.xavier_normal()(KEY, (3, 3, 64, 128)), t)


def test_torch_linear_default_matches_torch_layers():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 4096)
    wt, bt = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    w = to_f64(ini.torch_linear_default()(KEY, (512, 4096)))
    b = to_f64(ini.torch_linear_bias_default(512)(KEY, (4096,)))
    np.testing.assert_allclose(np.abs(w).max(), np.abs(wt).max(), rtol=40 / w.size)
    _same_std(w, wt)
    np.testing.assert_allclose(np.abs(b).max(), np.abs(bt).max(), rtol=40 / b.size)
    assert np.abs(b).max() <= 1 / math.sqrt(512)

    conv = torch.nn.Conv2d(64, 128, 3)
    ct = conv.weight.detach().double().numpy()
    c = to_f64(ini.torch_linear_default()(KEY, (3, 3, 64, 128)))
    np.testing.assert_allclose(np.abs(c).max(), np.abs(ct).max(), rtol=40 / c.size)
    np.testing.assert_allclose(np.abs(c).max(), 1 / math.sqrt(576), rtol=40 / c.size)


def test_torch_trunc_normal_bounds_are_absolute():
    # The porting trap the docs describe: a, b are values, not stds, so std=0.02 is untruncated.
    torch = pytest.importorskip("torch")
    t = _torch_sample(
        lambda t, g: torch.nn.init.trunc_normal_(t, std=0.02, generator=g), (512, 256)
    )
    check_distribution(t, 0.02, "normal")


TORCH_GAIN_NAMES = [
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "selu",
    "leaky_relu",
]


@pytest.mark.parametrize("name", TORCH_GAIN_NAMES)
def test_gain_matches_torch(name):
    torch = pytest.importorskip("torch")
    ours = ini.gain(name)
    assert isinstance(ours, float)
    np.testing.assert_allclose(ours, torch.nn.init.calculate_gain(name), rtol=1e-15)


@pytest.mark.parametrize("slope", [0.0, 0.2, 1.0, 3.0, -0.5])
def test_leaky_relu_gain_matches_torch(slope):
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(
        ini.gain("leaky_relu", negative_slope=slope),
        torch.nn.init.calculate_gain("leaky_relu", slope),
        rtol=1e-15,
    )


@pytest.mark.parametrize("slope", [0.0, 0.2, 3, -0.5])
def test_leaky_relu_slope_positional_as_torch(slope):
    # torch users write calculate_gain("leaky_relu", 0.2): the slope is the positional `param`.
    torch = pytest.importorskip("torch")
    want = torch.nn.init.calculate_gain("leaky_relu", slope)
    np.testing.assert_allclose(ini.gain("leaky_relu", slope), want, rtol=1e-15)
    np.testing.assert_allclose(ini.gain("leaky_relu", param=slope), want, rtol=1e-15)
    np.testing.assert_allclose(
        ini.gain("leaky_relu", None), torch.nn.init.calculate_gain("leaky_relu"), rtol=1e-15
    )


@pytest.mark.parametrize(
    ("spelling", "torch_name"),
    [
        ("ReLU", "relu"),
        ("Tanh", "tanh"),
        ("leaky-relu", "leaky_relu"),
        ("Leaky_ReLU", "leaky_relu"),
        ("Conv2D", "conv2d"),
        ("conv-transpose1d", "conv_transpose1d"),
        ("SELU", "selu"),
    ],
)
def test_gain_reads_names_as_activations_get(spelling, torch_name):
    # Case-insensitive, "-" or "_": the rules of jaxnorm.activations.get.
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(
        ini.gain(spelling), torch.nn.init.calculate_gain(torch_name), rtol=1e-15
    )


def test_gain_published_values():
    assert ini.gain("identity") == 1.0
    assert ini.gain("tanh") == pytest.approx(5 / 3, rel=1e-15)
    assert ini.gain("relu") == pytest.approx(2**0.5, rel=1e-15)
    assert ini.gain("leaky_relu") == pytest.approx((2 / (1 + 0.01**2)) ** 0.5, rel=1e-15)
    assert ini.gain("selu") == 0.75


# ------------------------------------------------------------------------------------------
# Orthogonal
# ------------------------------------------------------------------------------------------

# (shape, column_axis, rows of the matrix view, columns)
ORTHO_SHAPES = {
    "tall": ((64, 16), -1, 64, 16),
    "wide": ((16, 64), -1, 16, 64),
    "square": ((32, 32), -1, 32, 32),
    "conv_tall": ((3, 3, 8, 16), -1, 72, 16),
    "conv_wide": ((3, 3, 2, 32), -1, 18, 32),
    "column_axis_0": ((16, 40), 0, 40, 16),
}


def _matrix_view(w, column_axis):
    w = np.moveaxis(np.asarray(w, np.float64), column_axis, -1)
    return w.reshape(-1, w.shape[-1])


@pytest.mark.parametrize("scale", [1.0, 2.0**0.5])
@pytest.mark.parametrize("case", list(ORTHO_SHAPES))
def test_orthogonal_in_float64(case, scale):
    shape, axis, rows, cols = ORTHO_SHAPES[case]
    with jax.enable_x64(True):
        w = ini.orthogonal(scale, column_axis=axis)(KEY, shape, jnp.float64)
        assert w.dtype == jnp.float64 and w.shape == shape
        m = _matrix_view(w, axis)
    assert m.shape == (rows, cols)
    small = min(rows, cols)
    gram = m.T @ m if rows >= cols else m @ m.T
    np.testing.assert_allclose(gram, scale**2 * np.eye(small), atol=1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_orthogonal_low_precision(dtype):
    w = ini.orthogonal()(KEY, (3, 3, 8, 16), dtype)
    assert w.dtype == dtype
    m = _matrix_view(to_f64(w), -1)
    atol = {jnp.float32: 1e-5, jnp.float16: 5e-3, jnp.bfloat16: 3e-2}[dtype]
    np.testing.assert_allclose(m.T @ m, np.eye(16), atol=atol)


def test_orthogonal_is_haar_not_biased_by_qr_signs():
    # Under Haar measure every entry of a 3x3 orthogonal matrix has mean 0 and E[q^2] = 1/3.
    # Without the sign(diag R) correction LAPACK's QR gives diagonal means near -0.5.
    n = 2000
    keys = jax.random.split(KEY, n)
    qs = np.asarray(jax.vmap(lambda k: ini.orthogonal()(k, (3, 3)))(keys), np.float64)
    se = math.sqrt(1 / 3 / n)
    assert np.abs(qs.mean(axis=0)).max() < 5 * se
    np.testing.assert_allclose((qs**2).mean(axis=0), np.full((3, 3), 1 / 3), atol=0.03)


# ------------------------------------------------------------------------------------------
# Behaviour: the lecture's forward-pass experiment
# ------------------------------------------------------------------------------------------


def _forward_scales(init, act, depth=10, width=256):
    keys = jax.random.split(jax.random.key(1), depth + 1)
    h = jax.random.normal(keys[0], (512, width))
    scales = []
    for k in keys[1:]:
        z = h @ init(k, (width, width))
        scales.append(float(jnp.sqrt(jnp.mean(z * z))))
        h = act(z)
    return np.array(scales)


def test_he_normal_keeps_relu_activations_steady():
    s = _forward_scales(ini.he_normal(), jax.nn.relu)
    assert 0.5 < s[-1] / s[0] < 2.0
    # With LeCun's fan_in scale each ReLU layer halves the second moment: 2^-9 over 10 layers.
    s = _forward_scales(ini.lecun_normal(), jax.nn.relu)
    assert s[-1] / s[0] < 0.1


def test_small_normal_collapses_tanh_activations():
    # Each layer scales by about 0.01 * sqrt(256) = 0.16: the lecture's vanishing activations.
    s = _forward_scales(ini.small_normal(), jnp.tanh)
    assert s[-1] / s[0] < 1e-6
    s = _forward_scales(ini.xavier_normal(), jnp.tanh)
    assert s[-1] > 0.1


# ------------------------------------------------------------------------------------------
# dtypes, determinism, jit, vmap
# ------------------------------------------------------------------------------------------


def _shape_for(name):
    return (8,) if name == "torch_linear_bias_default" else (4, 6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_dtype_preserved_and_cast_once(name, dtype):
    init = ALL_FACTORIES[name]()
    shape = _shape_for(name)
    w = init(KEY, shape, dtype)
    assert w.dtype == dtype and w.shape == shape
    assert np.all(np.isfinite(to_f64(w)))
    # Sampled in float32 and rounded once: the float32 kernel rounded to dtype.
    np.testing.assert_array_equal(to_f64(w), to_f64(init(KEY, shape, jnp.float32).astype(dtype)))


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_default_dtype_option(name):
    factory = ALL_FACTORIES[name]
    init = factory(dtype=jnp.bfloat16)
    assert init(KEY, _shape_for(name)).dtype == jnp.bfloat16
    assert init(KEY, _shape_for(name), None).dtype == jnp.bfloat16
    assert factory()(KEY, _shape_for(name)).dtype == jnp.float32


def test_float64_under_x64():
    with jax.enable_x64(True):
        w = ini.he_normal()(KEY, DENSE[0], jnp.float64)
        assert w.dtype == jnp.float64
        check_distribution(w, math.sqrt(2 / 512), "normal")


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_deterministic_jit_and_vmap(name):
    init = ALL_FACTORIES[name]()
    shape = _shape_for(name)
    a, b = init(KEY, shape), init(KEY, shape)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(init(jax.random.key(1), shape)))
    jitted = jax.jit(init, static_argnums=(1, 2))
    np.testing.assert_allclose(
        np.asarray(jitted(KEY, shape, jnp.float32)), np.asarray(a), rtol=1e-6, atol=1e-7
    )
    keys = jax.random.split(KEY, 3)
    batched = jax.vmap(lambda k: init(k, shape))(keys)
    looped = np.stack([np.asarray(init(k, shape)) for k in keys])
    np.testing.assert_allclose(np.asarray(batched), looped, rtol=1e-6, atol=1e-7)


def test_raw_uint32_keys_work():
    raw = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(
        np.asarray(ini.he_normal()(raw, (4, 6))),
        np.asarray(ini.he_normal()(jax.random.wrap_key_data(raw), (4, 6))),
    )


def test_traced_hyperparameters_under_vmap():
    scales = jnp.array([0.5, 1.0, 2.0])
    base = np.asarray(ini.xavier_normal()(KEY, (8, 4)))
    out = jax.vmap(lambda g: ini.xavier_normal(gain=g)(KEY, (8, 4)))(scales)
    np.testing.assert_allclose(np.asarray(out), np.asarray(scales)[:, None, None] * base, rtol=1e-6)
    out = jax.vmap(lambda s: ini.small_normal(s)(KEY, (5,)))(scales)
    base = np.asarray(ini.small_normal(1.0)(KEY, (5,)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(scales)[:, None] * base, rtol=1e-6)
    # He et al.'s gain sqrt(2 / (1 + a^2)) relative to relu's sqrt(2) is 1 / sqrt(1 + a^2).
    slopes = jnp.array([0.0, 0.2, 1.0])
    out = jax.vmap(lambda a: ini.he_normal(negative_slope=a)(KEY, (8, 4)))(slopes)
    base = np.asarray(ini.he_normal()(KEY, (8, 4)))
    ratio = 1 / np.sqrt(1 + np.asarray(slopes, np.float64) ** 2)
    np.testing.assert_allclose(np.asarray(out), ratio[:, None, None] * base, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Complex dtypes: jax.nn.initializers' convention, the variance is E|w|^2
# ------------------------------------------------------------------------------------------

# The modulus of a unit complex normal cut at 2, from its closed form (not jaxnorm's constant):
# |z|^2 is Exp(1), and E[X | X < 4] = 1 - 4 e^-4 / (1 - e^-4).
_E4 = math.exp(-4.0)
COMPLEX_TRUNC_STD = math.sqrt(1 - 4 * _E4 / (1 - _E4))
JAX_COMPLEX_TRUNC_CONSTANT = 0.95311164380491208  # what jax.nn divides by: sqrt(1 - 5 e^-4)


def check_complex_distribution(w, std, kind):
    """E|w|^2 = std^2, split equally and uncorrelated between the real and imaginary parts."""
    z = np.asarray(w).astype(np.complex128).ravel()
    n = z.size
    power = np.abs(z) ** 2
    # |z|^2 has a relative standard deviation of at most 1 (Exp(1) for the normal); the real
    # part's square at most sqrt(2) (a normal's): 6 standard errors.
    np.testing.assert_allclose(power.mean(), std**2, rtol=6 / math.sqrt(n))
    np.testing.assert_allclose(z.real.var(), std**2 / 2, rtol=6 * math.sqrt(2 / n))
    np.testing.assert_allclose(z.imag.var(), std**2 / 2, rtol=6 * math.sqrt(2 / n))
    assert abs(np.mean(z.real * z.imag)) < 6 * std**2 / 2 / math.sqrt(n)
    assert abs(z.mean()) < 6 * std / math.sqrt(n)
    top = np.sqrt(power.max())
    if kind == "uniform":
        # Uniform on the disk of radius sqrt(2) std: P(max |z| < R (1 - 20/n)) is about e^-40.
        radius = math.sqrt(2) * std
        assert radius * (1 - 20 / n) <= top <= radius * (1 + 1e-6)
    elif kind == "truncated":
        bound = 2 * std / COMPLEX_TRUNC_STD
        assert 0.99 * bound <= top <= bound * (1 + 1e-6)
    else:
        # P(|z| > 2.5 std) = exp(-6.25) for a complex normal; far past the truncated bound (2.08).
        assert n * math.exp(-6.25) > 20 and top > 2.5 * std


@pytest.mark.parametrize("case", list(CASES))
def test_complex_statistics_match_closed_form(case):
    factory, family, kind = CASES[case]
    shape, fan_in, fan_out = DENSE
    w = factory()(KEY, shape, jnp.complex64)
    assert w.shape == shape and w.dtype == jnp.complex64
    check_complex_distribution(w, _std(family, fan_in, fan_out), kind)


def test_complex_small_normal_and_torch_bias_default():
    check_complex_distribution(ini.small_normal(0.5)(KEY, (512, 256), jnp.complex64), 0.5, "normal")
    # The disk with the real law's variance (1 / sqrt(fan_in))^2 / 3.
    b = ini.torch_linear_bias_default(64)(KEY, (200_000,), jnp.complex64)
    check_complex_distribution(b, 1 / math.sqrt(3 * 64), "uniform")


def test_complex128_under_x64():
    with jax.enable_x64(True):
        w = ini.he_normal()(KEY, DENSE[0], jnp.complex128)
        assert w.dtype == jnp.complex128
        check_complex_distribution(w, math.sqrt(2 / 512), "normal")


def test_complex_truncated_variance_is_the_stated_one_and_jax_nn_is_not():
    # 2M samples: the mean of |w|^2 to 0.41% (6 standard errors), against jax.nn's 1.87% excess.
    shape = (2048, 1024)
    target = 1 / 2048
    ours = np.abs(np.asarray(ini.lecun_normal(truncated=True)(KEY, shape, jnp.complex64))) ** 2
    theirs = np.abs(np.asarray(jax.nn.initializers.lecun_normal()(KEY, shape, jnp.complex64))) ** 2
    tol = 6 / math.sqrt(ours.size)
    np.testing.assert_allclose(ours.mean(), target, rtol=tol)
    excess = (COMPLEX_TRUNC_STD / JAX_COMPLEX_TRUNC_CONSTANT) ** 2
    assert abs(excess - 1.0187) < 1e-4
    np.testing.assert_allclose(theirs.mean(), target * excess, rtol=tol)
    assert theirs.mean() > target * (1 + tol)


COMPLEX_JAX_EQUIVALENTS = {k: v for k, v in JAX_EQUIVALENTS.items() if "truncated" not in k}


@pytest.mark.parametrize("shape", [(300, 200), (7, 5), (3, 3, 4, 8)], ids=str)
@pytest.mark.parametrize("case", list(COMPLEX_JAX_EQUIVALENTS))
def test_complex_bit_identical_to_jax_nn(case, shape):
    ours, theirs = COMPLEX_JAX_EQUIVALENTS[case]
    for seed in (0, 1):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(
            np.asarray(ours(key, shape, jnp.complex64)),
            np.asarray(theirs(key, shape, jnp.complex64)),
        )


def test_complex_truncated_presets_are_jax_nn_rescaled_to_the_stated_variance():
    pairs = [
        (ini.he_normal(truncated=True), jax.nn.initializers.he_normal()),
        (ini.xavier_normal(truncated=True), jax.nn.initializers.glorot_normal()),
    ]
    for ours, theirs in pairs:
        a = np.asarray(ours(KEY, (300, 200), jnp.complex64)).astype(np.complex128)
        b = np.asarray(theirs(KEY, (300, 200), jnp.complex64)).astype(np.complex128)
        np.testing.assert_allclose(a, b * JAX_COMPLEX_TRUNC_CONSTANT / COMPLEX_TRUNC_STD, rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 2.0**0.5])
@pytest.mark.parametrize("case", list(ORTHO_SHAPES))
def test_orthogonal_complex_is_unitary(case, scale):
    shape, axis, rows, cols = ORTHO_SHAPES[case]
    with jax.enable_x64(True):
        w = ini.orthogonal(scale, column_axis=axis)(KEY, shape, jnp.complex128)
        assert w.dtype == jnp.complex128 and w.shape == shape
    m = np.moveaxis(np.asarray(w), axis, -1).reshape(-1, shape[axis])
    assert m.shape == (rows, cols)
    gram = m.conj().T @ m if rows >= cols else m @ m.conj().T
    np.testing.assert_allclose(gram, scale**2 * np.eye(min(rows, cols)), atol=1e-12)
    assert np.abs(m.imag).max() > 0.1  # complex, not a real matrix in a complex dtype


def test_orthogonal_complex_is_haar():
    # Haar measure on U(3) is invariant under entrywise phases: every entry has E q = 0,
    # E q^2 = 0 and E|q|^2 = 1/3. A Q whose columns keep the QR routine's phase convention fails.
    n = 2000
    keys = jax.random.split(KEY, n)
    qs = np.asarray(jax.vmap(lambda k: ini.orthogonal()(k, (3, 3), jnp.complex64))(keys))
    qs = qs.astype(np.complex128)
    se = math.sqrt(1 / 3 / n)
    assert np.abs(qs.mean(axis=0)).max() < 5 * se
    assert np.abs((qs**2).mean(axis=0)).max() < 5 * se
    np.testing.assert_allclose((np.abs(qs) ** 2).mean(axis=0), np.full((3, 3), 1 / 3), atol=0.03)


# ------------------------------------------------------------------------------------------
# Zero-size shapes, dtype=None and out_sharding: jax.nn.initializers' calling convention
# ------------------------------------------------------------------------------------------


def _zero_size_shapes(name):
    if name in ("small_normal", "torch_linear_bias_default"):
        return [(0,), (3, 0)]
    # (0, 3, 8, 8): a receptive field of 0, so both fans are 0.
    return [(0, 4), (4, 0), (0, 0), (3, 3, 0, 8), (3, 3, 8, 0), (0, 3, 8, 8)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.complex64])
@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_zero_size_shapes_give_empty_arrays(name, dtype):
    init = ALL_FACTORIES[name]()
    jitted = jax.jit(init, static_argnums=(1, 2))
    for shape in _zero_size_shapes(name):
        for w in (init(KEY, shape, dtype), jitted(KEY, shape, dtype)):
            assert w.shape == shape and w.dtype == dtype


def test_zero_size_shapes_still_check_axes():
    with pytest.raises(ValueError, match="in_axis=5 is out of range"):
        ini.lecun_normal(in_axis=5)(KEY, (0, 4))
    with pytest.raises(ValueError, match="column_axis=2 is out of range"):
        ini.orthogonal(column_axis=2)(KEY, (0, 4))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ini.orthogonal()(KEY, (0,))


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_dtype_none_is_jax_default_float(name):
    # jax.nn's factories default to dtype=None: float32, or float64 under x64. Warnings are errors
    # here, so a float64 request truncated to float32 would fail.
    factory, shape = ALL_FACTORIES[name], _shape_for(name)
    w = factory(dtype=None)(KEY, shape)
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(w), np.asarray(factory()(KEY, shape)))
    assert factory(dtype=None)(KEY, shape, None).dtype == jnp.float32
    with jax.enable_x64(True):
        assert factory(dtype=None)(KEY, shape).dtype == jnp.float64
        assert factory(dtype=None)(KEY, shape, None).dtype == jnp.float64


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_out_sharding_places_the_same_values(name):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    init, shape = ALL_FACTORIES[name](), _shape_for(name)
    spec = P("x", *([None] * (len(shape) - 1)))
    mesh = jax.make_mesh((1,), ("x",))
    plain = np.asarray(init(KEY, shape))
    w = init(KEY, shape, jnp.float32, out_sharding=NamedSharding(mesh, spec))
    assert w.sharding.spec == spec and w.sharding.mesh == mesh
    np.testing.assert_array_equal(np.asarray(w), plain)
    with jax.set_mesh(mesh):
        w = init(KEY, shape, out_sharding=spec)
    assert w.sharding.spec == spec
    np.testing.assert_array_equal(np.asarray(w), plain)
    empty = (0, *shape[1:])
    w = init(KEY, empty, jnp.float32, out_sharding=NamedSharding(mesh, spec))
    assert w.shape == empty and w.sharding.spec == spec


# ------------------------------------------------------------------------------------------
# Flax
# ------------------------------------------------------------------------------------------


def test_linen_dense_and_conv_kernel_init():
    x = jnp.ones((2, 512))
    params = linen.Dense(256, kernel_init=ini.he_normal()).init(KEY, x)["params"]
    assert params["kernel"].shape == (512, 256)
    check_distribution(params["kernel"], math.sqrt(2 / 512), "normal")

    conv = linen.Conv(128, (3, 3), kernel_init=ini.he_uniform(), param_dtype=jnp.bfloat16)
    params = conv.init(KEY, jnp.ones((1, 8, 8, 64), jnp.bfloat16))["params"]
    k = params["kernel"]
    assert k.shape == (3, 3, 64, 128) and k.dtype == jnp.bfloat16
    # Flax's conv layout gives fan_in = 3 * 3 * 64.
    std = math.sqrt(2 / 576)
    np.testing.assert_allclose(to_f64(k).std(), std, rtol=0.02)
    assert np.abs(to_f64(k)).max() <= math.sqrt(3) * std * (1 + 2**-8)


def test_nnx_linear_kernel_and_bias_init():
    layer = nnx.Linear(
        512,
        256,
        kernel_init=ini.xavier_uniform(),
        bias_init=ini.torch_linear_bias_default(512),
        rngs=nnx.Rngs(0),
    )
    check_distribution(layer.kernel[...], math.sqrt(2 / (512 + 256)), "uniform")
    b = to_f64(layer.bias[...])
    assert b.shape == (256,) and 0 < np.abs(b).max() <= 1 / math.sqrt(512)
    layer = nnx.Linear(
        16, 8, kernel_init=ini.orthogonal(), param_dtype=jnp.float16, rngs=nnx.Rngs(0)
    )
    assert layer.kernel[...].dtype == jnp.float16
    np.testing.assert_allclose(
        to_f64(layer.kernel[...]).T @ to_f64(layer.kernel[...]), np.eye(8), atol=5e-3
    )


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KERNEL_FACTORIES))
@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((7,), "at least 2 dimensions"),
        ((), "at least 2 dimensions"),
        ((-1, 4), "negative"),
    ],
)
def test_kernel_shape_errors(name, shape, match):
    with pytest.raises(ValueError, match=match):
        KERNEL_FACTORIES[name]()(KEY, shape)


def test_orthogonal_shape_error_speaks_of_a_matrix_not_a_fan():
    # It once said "1/sqrt(fan) is undefined": orthogonal has no fan and no such scale.
    with pytest.raises(
        ValueError, match=r"orthogonal needs a shape with at least 2 dimensions"
    ) as e:
        ini.orthogonal()(KEY, (5,))
    assert "fan" not in str(e.value) and "sqrt" not in str(e.value)


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_dtype_errors(name):
    init = ALL_FACTORIES[name]()
    shape = _shape_for(name)
    for dtype in (jnp.int32, jnp.uint8, jnp.bool_):
        with pytest.raises(TypeError, match=rf"real .* or complex .*dtype={jnp.dtype(dtype)}"):
            init(KEY, shape, dtype)
    with pytest.raises(TypeError, match="sequence of ints"):
        init(KEY, (4.5, 2), jnp.float32)


def test_factory_dtype_error():
    with pytest.raises(TypeError, match=r"floating-point.*int8"):
        ini.he_normal(dtype=jnp.int8)
    with pytest.raises(TypeError, match="floating-point"):
        ini.small_normal(dtype=jnp.uint8)
    with pytest.raises(TypeError, match="not a dtype"):
        ini.orthogonal(dtype="float-ish")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"in_axis": 5}, "in_axis=5 is out of range"),
        ({"out_axis": -3}, "out_axis=-3 is out of range"),
        ({"in_axis": -1}, "must name different axes"),
        ({"batch_axis": 0, "in_axis": 0}, "must name different axes"),
        ({"in_axis": ()}, "at least one axis"),
        ({"in_axis": (0, -2)}, "names the same axis twice"),
    ],
)
def test_axis_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ini.lecun_normal(**kw)(KEY, (4, 6))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ini.xavier_normal(gain=-1.0), ValueError, "gain must be a finite number > 0"),
        (lambda: ini.lecun_uniform(gain=float("nan")), ValueError, "gain must be a finite"),
        (lambda: ini.xavier_uniform(gain=float("inf")), ValueError, "gain must be a finite"),
        (lambda: ini.lecun_normal(gain="2"), TypeError, "gain must be a real number"),
        (lambda: ini.lecun_normal(gain=True), TypeError, "gain must be a real number"),
        (lambda: ini.lecun_normal(gain=jnp.ones(2)), TypeError, "gain must be a real scalar"),
        (lambda: ini.small_normal(0.0), ValueError, "stddev must be a finite number > 0"),
        (lambda: ini.he_normal(mode="fan_avg"), ValueError, "mode must be 'fan_in' or 'fan_out'"),
        (lambda: ini.he_uniform(negative_slope=float("inf")), ValueError, "negative_slope must be"),
        (lambda: ini.he_normal(truncated="yes"), TypeError, "truncated must be True or False"),
        (lambda: ini.orthogonal(0.0), ValueError, "scale must be a finite number > 0"),
        (lambda: ini.orthogonal(column_axis=1.0), TypeError, "column_axis must be an int"),
        (lambda: ini.torch_linear_bias_default(0), ValueError, "fan_in must be at least 1"),
        (lambda: ini.torch_linear_bias_default(2.5), TypeError, "fan_in must be an int"),
    ],
)
def test_factory_argument_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_orthogonal_column_axis_out_of_range():
    with pytest.raises(ValueError, match="column_axis=2 is out of range"):
        ini.orthogonal(column_axis=2)(KEY, (4, 6))


def test_gain_errors():
    with pytest.raises(ValueError, match=r"unknown activation 'relux'.*known names: linear.*selu"):
        ini.gain("relux")
    with pytest.raises(ValueError, match=r"gelu has no agreed gain.*he_normal"):
        ini.gain("gelu")
    with pytest.raises(
        TypeError, match="gain\\('relu'\\) takes no options, but got negative_slope"
    ):
        ini.gain("relu", negative_slope=0.1)
    with pytest.raises(TypeError, match="takes only negative_slope, but got slope"):
        ini.gain("leaky_relu", slope=0.1)
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        ini.gain("leaky_relu", negative_slope="0.1")
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        ini.gain("leaky_relu", negative_slope=float("nan"))
    with pytest.raises(TypeError, match="name must be a string"):
        ini.gain(3)


def test_gain_param_errors():
    # torch ignores param for names other than leaky_relu; jaxnorm says it was not used.
    with pytest.raises(TypeError, match=r"gain\('relu'\) takes no parameter, but got param=0\.1"):
        ini.gain("relu", 0.1)
    with pytest.raises(TypeError, match=r"gain\('Tanh'\) takes no parameter"):
        ini.gain("Tanh", 1.0)
    with pytest.raises(TypeError, match="got the slope twice"):
        ini.gain("leaky_relu", 0.1, negative_slope=0.2)
    with pytest.raises(TypeError, match="negative_slope must be a real number, but got True"):
        ini.gain("leaky_relu", True)
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        ini.gain("leaky_relu", float("inf"))
    # An alias resolves as in activations.get, to a name with no agreed gain.
    with pytest.raises(ValueError, match=r"unknown activation 'Swish' \(Swish has no agreed gain"):
        ini.gain("Swish")
    with pytest.raises(ValueError, match=r"'PReLU' \(for PReLU use gain\('leaky_relu', slope\)"):
        ini.gain("PReLU")
