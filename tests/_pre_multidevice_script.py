"""Run by tests/test_preprocessing_multidevice.py in a subprocess with 8 host CPU devices.

Fits moments and PCA whitening on an 8-way sharded batch, with shard_map + axis_name and with a
sharded jit, and compares with the single-device fit. Prints OK on success.
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
print("OK")
