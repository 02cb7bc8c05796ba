"""Run by tests/test_preprocessing_multidevice.py in a subprocess with 8 host CPU devices.

Fits moments and PCA whitening on an 8-way sharded batch, with shard_map + axis_name and with a
sharded jit, and compares with the single-device fit; constant features must keep m2 == 0 exactly,
and data at offsets 1e5 to 1e6 its float64 eigenvalues. Prints OK on success.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnorm import preprocessing as pp

assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("d",))  # explicit sharding axes: jax's default
auto_mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
rng = np.random.default_rng(0)
x = 1e4 + rng.normal(size=(800, 6)) @ np.triu(rng.normal(size=(6, 6)) + 2 * np.eye(6))
x = x.astype(np.float32)
mask = rng.random(800) < 0.9

single = pp.moments(x, full_covariance=True, mask=mask)
single_diag = pp.moments(x, mask=mask)
t = pp.pca_whiten(eps=1e-5)
single_state = t.fit_moments(single)


def close(a, b, what, scale=3e-5):
    # Entrywise relative to each array's largest entry: with |mean| = 1e4 in float32, each value
    # carries an absolute rounding of about 1e4 * 6e-8, whatever the order of the sums.
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        atol = scale * max(np.abs(v).max(), 1e-30)
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=atol, err_msg=what)


xs = jax.device_put(x, NamedSharding(mesh, P("d")))
ms = jax.device_put(mask, NamedSharding(mesh, P("d")))
assert len(xs.sharding.device_set) == 8

# shard_map: each device sees 100 rows; axis_name merges with psum.
sharded_moments = jax.jit(
    jax.shard_map(
        lambda x, m: pp.moments(x, full_covariance=True, mask=m, axis_name="d"),
        mesh=mesh,
        in_specs=(P("d"), P("d")),
        out_specs=P(),
    )
)
close(sharded_moments(xs, ms), single, "shard_map moments (full)")
diag = jax.jit(
    jax.shard_map(
        lambda x, m: pp.moments(x, mask=m, axis_name="d"),
        mesh=mesh,
        in_specs=(P("d"), P("d")),
        out_specs=P(),
    )
)
close(diag(xs, ms), single_diag, "shard_map moments (diag)")
fit_sharded = jax.jit(
    jax.shard_map(
        lambda x, m: t.fit(x, mask=m, axis_name="d"),
        mesh=mesh,
        in_specs=(P("d"), P("d")),
        out_specs=P(),
    )
)
# Eigenvectors amplify the rounding differences of the moments by 1 / (eigenvalue gap).
close(fit_sharded(xs, ms), single_state, "shard_map pca_whiten fit", 1e-3)

# Sharded jit: the data lives on 8 devices; XLA partitions the reductions.
close(jax.jit(lambda x, m: pp.moments(x, full_covariance=True, mask=m))(xs, ms), single, "jit")
state = jax.jit(lambda x, m: t.fit(x, mask=m))(xs, ms)
close(state, single_state, "sharded jit fit", 1e-3)
for m_ in (auto_mesh,):
    xa = jax.device_put(x, NamedSharding(m_, P("d")))
    ma = jax.device_put(mask, NamedSharding(m_, P("d")))
    state_auto = jax.jit(lambda x, m: t.fit(x, mask=m))(xa, ma)
    close(state_auto, single_state, "sharded jit fit (auto mesh)", 1e-3)
z = jax.jit(t.apply)(state, xs)
np.testing.assert_allclose(np.cov(np.asarray(z, np.float64)[mask].T), np.eye(6), atol=1e-3)


def shard_map_moments(full):
    return jax.jit(
        jax.shard_map(
            lambda x, m: pp.moments(x, full_covariance=full, mask=m, axis_name="d"),
            mesh=mesh,
            in_specs=(P("d"), P("d")),
            out_specs=P(),
        )
    )


def on_mesh(a):
    return jax.device_put(a, NamedSharding(mesh, P("d")))


# Constant features: mean == the constant and m2 == 0 exactly, on every path. Uneven masks: the
# first 250 rows (devices 0 and 1, and half of device 2) are masked out, and device 5 is empty.
constants = np.array([0.1, 123.456, -7.3e5, 1e6 + 0.3], np.float32)
xk = np.concatenate(
    [np.broadcast_to(constants, (800, 4)), 1e4 + rng.normal(size=(800, 2))], axis=1
).astype(np.float32)
uneven = (np.arange(800) >= 250) & ((np.arange(800) < 500) | (np.arange(800) >= 600))
for full in (False, True):
    single_k = pp.moments(xk, full_covariance=full, mask=uneven)
    for what, got in (
        ("shard_map", shard_map_moments(full)(on_mesh(xk), on_mesh(uneven))),
        ("shard_map, all valid", shard_map_moments(full)(on_mesh(xk), on_mesh(np.ones(800, bool)))),
        (
            "sharded jit",
            jax.jit(lambda x, m, f=full: pp.moments(x, full_covariance=f, mask=m))(
                on_mesh(xk), on_mesh(uneven)
            ),
        ),
    ):
        np.testing.assert_array_equal(got.mean[:4], constants, err_msg=what)
        m2 = np.asarray(got.m2)
        np.testing.assert_array_equal(m2[:4], 0.0, err_msg=what)
        if full:
            np.testing.assert_array_equal(m2[:, :4], 0.0, err_msg=what)
    # Uneven masked shards equal the single-device moments (same shift, other summation order).
    close(shard_map_moments(full)(on_mesh(xk), on_mesh(uneven)), single_k, "uneven", 1e-6)
    # No valid example anywhere: zeros, not NaN.
    none = shard_map_moments(full)(on_mesh(xk), on_mesh(np.zeros(800, bool)))
    assert float(none.count) == 0, none
    np.testing.assert_array_equal(none.mean, 0.0)
    np.testing.assert_array_equal(none.m2, 0.0)

# Offsets 1e5 and 1e6: merging the devices' float32 means directly lost |mean| * 6e-8 each (an
# m2 error 100x the single-device fit's at 1e5); with the shared shift the 8-device fit keeps
# the float64 eigenvalues as tightly as the single-device fit does.
q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
g = rng.normal(size=(8000, 16)) * np.linspace(3.0, 0.3, 16)
pca = pp.pca()
fit_pca = jax.jit(
    jax.shard_map(lambda x: pca.fit(x, axis_name="d"), mesh=mesh, in_specs=P("d"), out_specs=P())
)
for offset in (1e5, 1e6):
    xo = (g @ q.T + offset).astype(np.float32)
    xr = xo.astype(np.float64)
    lam = np.linalg.eigvalsh(np.cov(xr.T))[::-1]
    spacing = float(np.spacing(np.float32(offset)))
    for what, st in (
        ("single device", pca.fit(xo)),
        ("shard_map", fit_pca(on_mesh(xo))),
        ("sharded jit", jax.jit(pca.fit)(on_mesh(xo))),
    ):
        err = np.abs(np.asarray(st.explained_variance, np.float64) - lam).max() / lam[0]
        assert err < 5e-6, (offset, what, err)
        np.testing.assert_allclose(st.mean, xr.mean(0), rtol=0, atol=spacing, err_msg=what)
    m8 = shard_map_moments(False)(on_mesh(xo), on_mesh(np.ones(8000, bool)))
    ref = ((xr - xr.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(m8.m2, ref, rtol=2e-5, err_msg=f"m2 at {offset}")
print("OK")
