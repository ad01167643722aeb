"""kgrad.attribution on users' paths: datasets, subclassed, saved and changed models, threads.

Each result is compared with an independent computation of the same map: the
one-batch call, the closed form of a linear model, or the same call made
sequentially.
"""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

A = kgrad.attribution


def _cnn(seed=0, with_input=True):
    keras.utils.set_random_seed(seed)
    layers = [
        keras.layers.Conv2D(4, 3, activation="tanh", name="conv"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, name="head"),
    ]
    return keras.Sequential(([keras.Input((7, 7, 2))] if with_input else []) + layers)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, activation="relu", name="conv")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.pool(self.conv(x)))


def test_a_tf_data_dataset_with_a_partial_last_batch(rng):
    tf = pytest.importorskip("tensorflow")
    model = _cnn()
    x = rng.uniform(size=(5, 7, 7, 2)).astype("float32")
    y = np.arange(5) % 3
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)  # 2, 2, 1; labels unused
    for fn in (A.saliency, A.integrated_gradients, A.smoothgrad):
        kw = {"seed": 0} if fn is A.smoothgrad else {}
        streamed = np_(fn(model, data, target=2, **kw))
        if fn is A.smoothgrad:  # the noise is drawn batch by batch from one generator
            assert streamed.shape == x.shape and np.isfinite(streamed).all()
            continue
        np.testing.assert_allclose(streamed, np_(fn(model, x, target=2)), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="per-sample `target`"):
        A.saliency(model, data, target=y)


def test_subclassed_and_input_free_models(rng):
    x = rng.uniform(size=(3, 7, 7, 2)).astype("float32")
    t = np.array([2, 0, 1])
    sub = Subclassed()
    sub(x[:1])
    cam = np_(A.gradcam(sub, x, target=t, resize=False))  # layer=None: found by running
    np.testing.assert_allclose(cam, np_(A.gradcam(sub, x, target=t, layer="conv", resize=False)))
    loop = [np_(A.saliency(sub, x[i : i + 1], target=int(t[i]))) for i in range(3)]
    np.testing.assert_allclose(
        np_(A.saliency(sub, x, target=t)), np.concatenate(loop), rtol=1e-5, atol=1e-8
    )
    bare = _cnn(with_input=False)
    bare(x[:1])
    with_input = _cnn()
    with_input.set_weights(bare.get_weights())
    np.testing.assert_allclose(
        np_(A.gradcam(bare, x, target=t)), np_(A.gradcam(with_input, x, target=t)), rtol=1e-6
    )


def test_a_saved_and_reloaded_model_gives_the_same_maps(rng, tmp_path):
    model = _cnn(1)
    x = rng.uniform(size=(2, 7, 7, 2)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    for fn in (A.integrated_gradients, A.gradcam):
        np.testing.assert_allclose(np_(fn(loaded, x, target=1)), np_(fn(model, x, target=1)))


def test_new_weights_give_new_maps(rng):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    x = rng.normal(size=(4, 3)).astype("float32")
    for scale in (1.0, -3.0):  # the second call reuses the compiled function
        w = scale * np.arange(6, dtype="float32").reshape(3, 2)
        model.set_weights([w])
        np.testing.assert_allclose(
            np_(A.integrated_gradients(model, x, target=1)), x * w[:, 1], rtol=1e-5
        )
        np.testing.assert_allclose(np_(A.saliency(model, x, target=1, abs=False)), 0 * x + w[:, 1])


def test_a_callable_target_is_linear(rng):
    model = _cnn(2)
    x = rng.uniform(size=(2, 7, 7, 2)).astype("float32")
    contrast = np_(A.integrated_gradients(model, x, target=lambda y: y[:, 1] - y[:, 0]))
    ig = [np_(A.integrated_gradients(model, x, target=k)) for k in (0, 1)]
    np.testing.assert_allclose(contrast, ig[1] - ig[0], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="keep the batch axis"):
        A.integrated_gradients(model, x, target=lambda y: keras.ops.sum(y), return_delta=True)


def test_two_threads_get_their_own_targets(rng):
    model = _cnn(3)
    x = rng.uniform(size=(3, 7, 7, 2)).astype("float32")
    expected = {k: np_(A.integrated_gradients(model, x, target=k, steps=10)) for k in (0, 2)}
    results, errors = {}, []

    def work(k):
        try:
            for _ in range(3):
                results[k] = np_(A.integrated_gradients(model, x, target=k, steps=10))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for k in (0, 2):
        np.testing.assert_allclose(results[k], expected[k], rtol=1e-6)


def test_interacting_samples_are_refused(rng):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    x = rng.normal(size=(3, 4)).astype("float32")
    with pytest.raises(ValueError, match="training=True"):
        A.saliency(model, x, target=0, training=True)
    # Dropout is off by default, so the maps are deterministic.
    drop = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    np.testing.assert_array_equal(
        np_(A.saliency(drop, x, target=1)), np_(A.saliency(drop, x, target=1))
    )


def test_a_grown_model_gets_its_new_output_size(rng):
    # A per-sample target of -1 is the last class of the model as it is now.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, use_bias=False)])
    x = rng.normal(size=(2, 3)).astype("float32")
    A.saliency(model, x, target=np.array([-1, -1]))
    model.add(keras.layers.Dense(5, use_bias=False))
    k1, k2 = (np_(layer.kernel) for layer in model.layers)
    got = np_(A.saliency(model, x, target=np.array([-1, 0]), abs=False))
    np.testing.assert_allclose(got, np.stack([k1 @ k2[:, -1], k1 @ k2[:, 0]]), rtol=1e-5)


@pytest.mark.parametrize("layer", [None, "act", "conv"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested backbone"])
def test_gradcam_refuses_a_model_with_channels_first_activations(layer, nested, rng):
    # The Activation has no data_format of its own, but its output has channels
    # on axis 1 like the convolution's: Grad-CAM would average a spatial axis.
    L = keras.layers
    inp = keras.Input((3, 8, 8))
    h = L.Conv2D(4, 3, data_format="channels_first", name="conv")(inp)
    h = L.Activation("relu", name="act")(h)
    pool = L.GlobalAveragePooling2D(data_format="channels_first")
    if nested:
        outer = keras.Input((3, 8, 8))
        feats = keras.Model(inp, h, name="backbone")(outer)
        model = keras.Model(outer, L.Dense(2)(pool(feats)))
        layer = None if layer is None else f"backbone/{layer}"
    else:
        model = keras.Model(inp, L.Dense(2)(pool(h)))
    x = rng.normal(size=(2, 3, 8, 8)).astype("float32")
    with pytest.raises(ValueError, match=r"channels_first.*Received: layer="):
        A.gradcam(model, x, target=0, layer=layer)
