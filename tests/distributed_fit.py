"""Training through kgrad under each framework's own engine, against one device.

Run by tests/test_distribution.py in a process of its own::

    python tests/distributed_fit.py jax          # DataParallel, 8 simulated CPU devices
    python tests/distributed_fit.py tensorflow   # MirroredStrategy, 2 logical CPU devices

A critic with a gradient penalty, ``mean((|grad_x f| - 1)^2)`` on
``kgrad.grad(self, x)``, plus a physics-informed term on ``kgrad.laplacian``,
trained with SGD by ``fit`` on one device and under the engine, from the same
weights on the same batches. Prints one JSON line: both runs' final weights
and losses.
"""

from __future__ import annotations

import json
import os
import sys

ENGINE = sys.argv[1]
os.environ["KERAS_BACKEND"] = ENGINE
if ENGINE == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

if ENGINE == "tensorflow":  # two logical CPU devices, before TensorFlow starts its runtime
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kgrad  # noqa: E402

ops = keras.ops


class Critic(keras.Model):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        g = kgrad.grad(self, x)
        penalty = ops.mean((ops.sqrt(ops.sum(g**2, axis=1) + 1e-12) - 1.0) ** 2)
        residual = kgrad.laplacian(self, x)[:, 0] - 1.0
        loss = penalty + 0.1 * ops.mean(residual**2)
        if ENGINE == "tensorflow":
            # Each replica's share of the loss, as Keras scales its compiled losses
            # (tf.distribute sums the replicas' gradients); on JAX the batch is global.
            import tensorflow as tf

            loss = loss / tf.distribute.get_strategy().num_replicas_in_sync
        return loss


def build():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    return Critic(inputs, keras.layers.Dense(1)(h))


def train(weights, x, strategy=None):
    def make():
        model = build()
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
        return model

    if strategy is None:
        model = make()
    else:
        with strategy.scope():
            model = make()
    history = model.fit(
        x, np.zeros((len(x), 1), "float32"), batch_size=16, epochs=3, shuffle=False, verbose=0
    )
    return [np.asarray(w).tolist() for w in model.get_weights()], history.history["loss"]


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    weights = build().get_weights()
    if ENGINE == "jax":
        import jax

        single = train(weights, x)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        spread = train(weights, x)
        devices = len(jax.devices())
    else:
        single = train(weights, x)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        spread = train(weights, x, strategy)
        devices = strategy.num_replicas_in_sync
    print(json.dumps({"devices": devices, "single": single, "spread": spread}))


if __name__ == "__main__":
    main()
