"""jaxnorm in one page: preprocess, initialise, batch-normalise, check gradients, train.

Runs in well under a minute on a laptop CPU (or whatever JAX sees):

    pip install -e . && python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import optax

import jaxnorm as jn
from jaxnorm import batchnorm, initializers, preprocessing

NUM_CLASSES, DIM, HIDDEN = 3, 8, 64


def make_data(key, n):
    """Gaussian clouds around three centres, far from the origin, as raw measurements are."""
    k_lab, k_x = jax.random.split(key)
    labels = jax.random.randint(k_lab, (n,), 0, NUM_CLASSES)
    centres = 3.0 * jax.random.normal(jax.random.key(42), (NUM_CLASSES, DIM))
    x = centres[labels] + jax.random.normal(k_x, (n, DIM))
    return 100.0 + 25.0 * x, labels  # a large offset and scale, as raw measurements have


def init_params(key):
    k1, k2 = jax.random.split(key)
    he = initializers.he_normal()  # He et al. 2015: std sqrt(2 / fan_in) for ReLU layers
    return {
        "w1": he(k1, (DIM, HIDDEN)),
        "gamma": jnp.ones(HIDDEN),
        "beta": jnp.zeros(HIDDEN),
        # A small last layer makes the first softmax nearly uniform: initial loss about log(C).
        "w2": initializers.small_normal(0.01)(k2, (HIDDEN, NUM_CLASSES)),
        "b2": jnp.zeros(NUM_CLASSES),
    }


def forward(params, bn_state, x, *, train):
    # Batch norm with the ReLU fused in: the pre-activation is never stored.
    h, bn_state = jn.batch_norm(
        x @ params["w1"], params["gamma"], params["beta"], bn_state, train=train, activation="relu"
    )
    return h @ params["w2"] + params["b2"], bn_state


def loss_fn(params, bn_state, x, y):
    logits, bn_state = forward(params, bn_state, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), bn_state


def main():
    print("devices:", jax.devices())
    k_train, k_test, k_init = jax.random.split(jax.random.key(0), 3)
    x_train, y_train = make_data(k_train, 2048)
    x_test, y_test = make_data(k_test, 512)

    # Step 1 of the lecture: fit the preprocessing on the training split only, apply it to both.
    scaler = preprocessing.chain(preprocessing.zero_center(), preprocessing.normalize())
    scaler_state = scaler.fit(x_train)
    x_train, x_test = scaler.apply(scaler_state, x_train), scaler.apply(scaler_state, x_test)

    params = init_params(k_init)
    bn_state = batchnorm.init_state(HIDDEN)

    # Sanity check: the first loss should be about log(num_classes).
    first_loss, _ = loss_fn(params, bn_state, x_train, y_train)
    print(f"initial loss {float(first_loss):.3f}, expected about log(3) = {jnp.log(3.0):.3f}")

    # Gradient check on a small batch: analytic jax.grad against float64 centred differences.
    report = jn.check_grad(lambda p: loss_fn(p, bn_state, x_train[:32], y_train[:32])[0], params)
    print(report)

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, bn_state, opt_state, x, y):
        (loss, bn_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bn_state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), bn_state, opt_state, loss

    for epoch in range(5):
        for i in range(0, len(x_train), 128):
            params, bn_state, opt_state, loss = step(
                params, bn_state, opt_state, x_train[i : i + 128], y_train[i : i + 128]
            )
        logits, _ = forward(params, bn_state, x_test, train=False)
        accuracy = (logits.argmax(-1) == y_test).mean()
        print(f"epoch {epoch}: loss {float(loss):.4f}, test accuracy {float(accuracy):.3f}")


if __name__ == "__main__":
    main()
