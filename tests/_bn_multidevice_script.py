"""Run by tests/test_batchnorm_multidevice.py with 8 host devices: sharded == single device.

Prints "ALL OK" when every check passed; any mismatch raises.
"""

import numpy as np


def main():
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxnorm import batchnorm as bn

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)

    def close(a, b, what, rtol=2e-5, atol=2e-4):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=what)

    def close_tree(a, b, what, **kw):
        for i, (u, v) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
            close(u, v, f"{what} [leaf {i}]", **kw)

    mesh = jax.make_mesh((8,), ("b",))
    auto_mesh = jax.make_mesh((8,), ("b",), axis_types=(AxisType.Auto,))

    def shard(a, m=mesh):
        return jax.device_put(a, NamedSharding(m, P("b")))

    def run_shard_map(x, mask, scale, bias, state, loss_w, **kw):
        """(y, state, grads of sum(y * w) wrt x, scale, bias) with statistics over axis 'b'."""

        def local(x, mask, w, scale, bias, state):
            def loss(x, scale, bias):
                y, new = bn.batch_norm(
                    x, scale, bias, state, train=True, axis_name="b", mask=mask, **kw
                )
                # psum: the global loss, so the per-device gradients are those of the whole batch.
                return jax.lax.psum(jnp.sum(y * w), "b"), (y, new)

            grads, (y, new) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
            return y, new, grads

        specs = (P("b"), P("b"), P("b"), P(), P(), P())
        out = (P("b"), P(), (P("b"), P(), P()))
        f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out))
        return f(shard(x), shard(mask), shard(loss_w), scale, bias, state)

    def run_single(x, mask, scale, bias, state, loss_w, **kw):
        def loss(x, scale, bias):
            y, new = bn.batch_norm(x, scale, bias, state, train=True, mask=mask, **kw)
            return jnp.sum(y * loss_w), (y, new)

        grads, (y, new) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
        return y, new, grads

    def params(c):
        scale = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
        bias = jnp.asarray(rng.normal(size=c), jnp.float32)
        return scale, bias, bn.init_state(c)

    # 1. Dense data far from zero, no padding, and with uneven padding (device i keeps i rows).
    x = jnp.asarray(100.0 + 3.0 * rng.normal(size=(32, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    scale, bias, state = params(6)
    masks = {
        "no mask": np.ones(32, bool),
        "uneven mask": np.concatenate([np.arange(4) < i for i in range(8)]),
        "random mask": rng.uniform(size=32) > 0.5,
    }
    for name, mask in masks.items():
        for act in (None, "relu"):
            got = run_shard_map(x, jnp.asarray(mask), scale, bias, state, w, activation=act)
            want = run_single(x, jnp.asarray(mask), scale, bias, state, w, activation=act)
            close_tree(got, want, f"shard_map {name} activation={act}")
            print("ok shard_map", name, act)

    # 2. NHWC images with whole-image padding, unbiased running var.
    x4 = jnp.asarray(-5.0 + rng.normal(size=(16, 3, 3, 4)), jnp.float32)
    w4 = jnp.asarray(rng.normal(size=(16, 3, 3, 4)), jnp.float32)
    m4 = jnp.asarray(np.repeat(np.array([1, 1, 0, 1, 1, 0, 0, 0], bool), 2).reshape(16, 1, 1))
    m4 = jnp.broadcast_to(m4, (16, 3, 3))
    scale4, bias4, state4 = params(4)
    got = run_shard_map(x4, m4, scale4, bias4, state4, w4, unbiased_running_var=True)
    want = run_single(x4, m4, scale4, bias4, state4, w4, unbiased_running_var=True)
    close_tree(got, want, "shard_map NHWC")
    print("ok shard_map NHWC")

    # 3. axis_index_groups: two groups of 4 devices, each equal to one device on its half.
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def grouped(x, mask):
        y, new = bn.batch_norm(
            x, scale, bias, state, train=True, axis_name="b", axis_index_groups=groups, mask=mask
        )
        return y, new.mean[None], new.var[None]

    f = jax.jit(
        jax.shard_map(
            grouped,
            mesh=mesh,
            in_specs=(P("b"), P("b")),
            out_specs=(P("b"), P("b"), P("b")),
            check_vma=False,
        )
    )
    mask = jnp.asarray(masks["uneven mask"])
    y, means, variances = map(np.asarray, f(shard(x), shard(mask)))
    for g in range(2):
        rows = slice(16 * g, 16 * g + 16)
        y1, s1 = bn.batch_norm(x[rows], scale, bias, state, train=True, mask=mask[rows])
        close(y[rows], y1, f"groups y {g}")
        # out_specs P("b") stacks the per-device copies of the state: 8 rows of 6 features.
        for d in range(4 * g, 4 * g + 4):
            close(means[d], s1.mean, f"groups mean {g}")
            close(variances[d], s1.var, f"groups var {g}")
    print("ok axis_index_groups")

    # 4. Ghost batch norm with axis_name: virtual batches are local, the running average global.
    got = run_shard_map(
        x, jnp.asarray(masks["no mask"]), scale, bias, state, w, virtual_batch_size=2
    )
    want = run_single(x, jnp.asarray(masks["no mask"]), scale, bias, state, w, virtual_batch_size=2)
    close_tree(got, want, "ghost")
    print("ok ghost")

    # 5. Sharded jit, no axis_name: XLA makes the reductions global (explicit and auto meshes).
    for mname, m in (("explicit", mesh), ("auto", auto_mesh)):
        for name in ("no mask", "uneven mask"):
            mask = jnp.asarray(masks[name])

            def step(x, mask, w, scale, bias):
                def loss(x, scale, bias):
                    y, new = bn.batch_norm(x, scale, bias, state, train=True, mask=mask)
                    return jnp.sum(y * w), (y, new)

                g, (y, new) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
                return y, new, g

            got = jax.jit(step)(shard(x, m), shard(mask, m), shard(w, m), scale, bias)
            want = step(x, mask, w, scale, bias)
            close_tree(got, want, f"sharded jit {mname} {name}")
            assert got[0].sharding.spec[0] == "b" or mname == "auto", got[0].sharding
            print("ok sharded jit", mname, name)

    # 6. Large offset across devices: the merge needs no shared pivot.
    xo = jnp.asarray(1e4 + rng.normal(size=(64, 3)), jnp.float32)
    mo = jnp.asarray(rng.uniform(size=64) > 0.3)

    def big(x, mask):
        return bn.batch_norm(
            x, None, None, bn.init_state(3), train=True, axis_name="b", mask=mask, momentum=0.0
        )[1]

    s = jax.jit(jax.shard_map(big, mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P()))(
        shard(xo), shard(mo)
    )
    ref = np.asarray(xo, np.float64)[np.asarray(mo)].var(0)
    np.testing.assert_allclose(np.asarray(s.var), ref, rtol=1e-3)
    print("ok large offset")

    # 7. The refinement pass about the mean runs on every device at once (its predicate is
    # merged with the statistics) and psums its sums: finite data near 1e19, whose squares
    # overflow, with uneven masks and with axis_index_groups; and refinement forced
    # (_MAX_SHIFT = 0) on ordinary data, gradients included.
    xh = jnp.asarray(rng.choice([-1.0, 1.0], (64, 3)) * rng.uniform(1.2, 1.8, (64, 3)) * 1e19)
    xh = xh.astype(jnp.float32)
    mh = jnp.asarray(np.concatenate([np.arange(8) < i + 1 for i in range(8)]))
    s = jax.jit(jax.shard_map(big, mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P()))(
        shard(xh), shard(mh)
    )
    x64 = np.asarray(xh, np.float64)[np.asarray(mh)]
    np.testing.assert_allclose(np.asarray(s.var), x64.var(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s.mean), x64.mean(0), rtol=1e-4, atol=1e-5 * 1e19)

    def grouped_big(x):
        return bn.batch_norm(
            x,
            None,
            None,
            bn.init_state(3),
            train=True,
            axis_name="b",
            axis_index_groups=groups,
            momentum=0.0,
        )[1].var[None]

    v = jax.jit(
        jax.shard_map(grouped_big, mesh=mesh, in_specs=P("b"), out_specs=P("b"), check_vma=False)
    )(shard(xh))
    for g in range(2):
        ref = np.asarray(xh, np.float64)[32 * g : 32 * g + 32].var(0)
        for d in range(4 * g, 4 * g + 4):
            np.testing.assert_allclose(np.asarray(v)[d], ref, rtol=1e-5)
    print("ok refinement of squares that overflow")
    max_shift, bn._MAX_SHIFT = bn._MAX_SHIFT, 0.0
    try:
        for name, mask in masks.items():
            got = run_shard_map(x, jnp.asarray(mask), scale, bias, state, w)
            want = run_single(x, jnp.asarray(mask), scale, bias, state, w)
            close_tree(got, want, f"forced refinement {name}")
    finally:
        bn._MAX_SHIFT = max_shift
    print("ok forced refinement")
    print("ALL OK")


if __name__ == "__main__":
    main()
