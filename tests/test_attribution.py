"""kgrad.attribution against closed forms, NumPy, a batch-size-1 loop, and the peers' code.

References: a linear model's integrated gradients are exactly (x − b) ⊙ w (times
Captum's weight sum (n − 1)/n for its trapezoid rule); a quadratic model's are
c ⊙ (x² − b²) for the exact rules; Grad-CAM behind global average pooling has the
closed-form gradient kernel[:, t] / (h·w); resizing is checked against
scipy.ndimage.zoom(order=1). Keras computes in float32, so agreement is to about
1e-6 relative (float32 rounding of sums over 50 nodes).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

A = kgrad.attribution
W = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0]], "float32")
METHODS = ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]


def _linear():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    model.set_weights([W])
    return model


def _rules(method, n):
    """Captum's nodes and weights, written out from its definitions (API.md §6)."""
    if method == "gausslegendre":
        t, v = np.polynomial.legendre.leggauss(n)
        return (1 + t) / 2, v / 2
    w = np.full(n, 1 / n)
    a = {
        "riemann_left": np.linspace(0, 1 - 1 / n, n),
        "riemann_right": np.linspace(1 / n, 1, n),
        "riemann_middle": np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n),
        "riemann_trapezoid": np.linspace(0, 1, n),
    }[method]
    if method == "riemann_trapezoid":
        w[0] = w[-1] = 1 / (2 * n)
    return a, w


def _cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((9, 9, 2)),
            keras.layers.Conv2D(4, 3, activation="tanh", name="conv"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(3, name="head"),
        ]
    )


@pytest.mark.parametrize("method", METHODS)
def test_integrated_gradients_of_a_linear_model_are_x_minus_baseline_times_w(rng, method):
    x = rng.normal(size=(5, 3)).astype("float32")
    t = np.array([0, 1, 1, 0, -1])
    base = rng.normal(size=(3,)).astype("float32")  # one sample's shape, broadcast
    ig, delta = A.integrated_gradients(
        _linear(), x, target=t, baseline=base, steps=7, method=method, return_delta=True
    )
    total = _rules(method, 7)[1].sum()  # 1 for every rule but Captum's trapezoid: 6/7
    expected = (x - base) * W.T[t % 2] * total
    np.testing.assert_allclose(np_(ig), expected, rtol=1e-5, atol=1e-6)
    # delta = Σ attributions − (F(x) − F(b)) = (total − 1)(F(x) − F(b)), signed.
    gap = ((x - base) * W.T[t % 2]).sum(axis=1)
    np.testing.assert_allclose(np_(delta), (total - 1) * gap, atol=2e-6)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle", "riemann_trapezoid"])
def test_integrated_gradients_of_a_quadratic_against_numpy(rng, method):
    c = np.array([0.5, -1.0, 2.0, 0.25], "float32")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Lambda(
                lambda v: keras.ops.sum(keras.ops.convert_to_tensor(c) * v * v, axis=1)
            ),
        ]
    )
    x = rng.normal(size=(3, 4)).astype("float32")
    b = rng.normal(size=(3, 4)).astype("float32")  # x's shape
    ig = np_(A.integrated_gradients(model, x, baseline=b, steps=6, method=method))
    a, w = _rules(method, 6)
    d = x.astype("float64") - b
    by_hand = d * sum(wk * 2 * c * (b + ak * d) for ak, wk in zip(a, w))
    np.testing.assert_allclose(ig, by_hand, rtol=1e-5, atol=1e-6)
    if method != "riemann_trapezoid":  # exact for an integrand linear in the node
        np.testing.assert_allclose(ig, c * (x.astype("float64") ** 2 - b**2), rtol=1e-5, atol=1e-6)


def test_completeness_and_delta_on_a_cnn(rng):
    model = _cnn()
    x = rng.uniform(size=(3, 9, 9, 2)).astype("float32")
    ig, delta = A.integrated_gradients(model, x, target=2, baseline=0.1, return_delta=True)
    fx = np_(model(x))[:, 2]
    fb = np_(model(np.full_like(x, 0.1)))[:, 2]
    sums = np_(ig).reshape(3, -1).sum(axis=1)
    np.testing.assert_allclose(np_(delta), sums - (fx - fb), atol=1e-6)
    assert np.abs(np_(delta)).max() < 1e-4 * np.abs(fx - fb).max()  # 50 Gauss nodes


@pytest.mark.parametrize("batch_size", [1, 2, 4, 7, 13])
def test_batch_size_bounds_the_interpolated_samples_held_at_once(rng, batch_size):
    seen = []

    def f(v):  # a plain callable: it sees every evaluated batch as it is
        seen.append(int(v.shape[0]))
        return keras.ops.tanh(v @ keras.ops.convert_to_tensor(W))

    x = rng.normal(size=(3, 3)).astype("float32")
    ig = A.integrated_gradients(f, x, target=1, steps=5, batch_size=batch_size)
    whole = A.integrated_gradients(f, x, target=1, steps=5)
    assert max(seen[:-1]) <= batch_size and seen[-1] == 15
    np.testing.assert_allclose(np_(ig), np_(whole), rtol=1e-5, atol=1e-7)


def test_per_sample_targets_match_a_batch_size_one_loop(rng):
    model = _cnn()
    x = rng.uniform(size=(4, 9, 9, 2)).astype("float32")
    t = np.array([2, 0, 1, 2])
    for fn, kw in [
        (A.saliency, {"abs": False}),
        (A.input_x_gradient, {}),
        (A.integrated_gradients, {"steps": 8}),
        (A.gradcam, {}),
    ]:
        batched = np_(fn(model, x, target=t, **kw))
        loop = np.concatenate(
            [np_(fn(model, x[i : i + 1], target=int(t[i]), **kw)) for i in range(4)]
        )
        np.testing.assert_allclose(batched, loop, rtol=1e-5, atol=1e-7, err_msg=fn.__name__)


def test_saliency_and_input_x_gradient_of_a_linear_model(rng):
    x = rng.normal(size=(2, 3)).astype("float32")
    np.testing.assert_allclose(np_(A.saliency(_linear(), x, target=0)), np.abs(W[:, 0]) + 0 * x)
    signed = np_(A.saliency(_linear(), x, target=(1,), abs=False))
    np.testing.assert_allclose(signed, W[:, 1] + 0 * x)
    np.testing.assert_allclose(
        np_(A.input_x_gradient(_linear(), x, target=1)), x * W[:, 1], rtol=1e-6
    )


def test_smoothgrad_is_the_mean_gradient_at_seeded_noise(rng):
    c = np.array([0.5, -1.0, 2.0], "float32")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Lambda(
                lambda v: keras.ops.sum(keras.ops.convert_to_tensor(c) * v**3, axis=1)
            ),
        ]
    )
    x = rng.normal(size=(2, 3)).astype("float32")
    g = np_(A.smoothgrad(model, x, samples=4, noise=0.2, seed=7))
    again = np_(A.smoothgrad(model, x, samples=4, noise=0.2, seed=7))
    other = np_(A.smoothgrad(model, x, samples=4, noise=0.2, seed=8))
    sq = np_(A.smoothgrad(model, x, samples=4, noise=0.2, seed=7, squared=True))
    sigma = 0.2 * (x.max(axis=1) - x.min(axis=1))
    noisy = x + sigma[None, :, None] * np.random.RandomState(7).standard_normal((4, 2, 3))
    grads = 3 * c * noisy**2  # the gradient of Σ c v³ at each noisy copy
    np.testing.assert_allclose(g, grads.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(sq, (grads**2).mean(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(g, again)
    assert not np.allclose(g, other)
    plain = np_(A.saliency(model, x, abs=False))
    np.testing.assert_allclose(np_(A.smoothgrad(model, x, noise=0.0)), plain, rtol=1e-6)


def _zoom(cam, size):
    from scipy import ndimage

    return np.stack(
        [ndimage.zoom(m, (size[0] / m.shape[0], size[1] / m.shape[1]), order=1) for m in cam]
    )


def test_gradcam_against_its_closed_form_behind_global_average_pooling(rng):
    model = _cnn(1)
    x = rng.uniform(size=(3, 9, 9, 2)).astype("float32")
    t = np.array([0, 2, 1])
    conv = keras.Model(model.inputs, model.get_layer("conv").output)
    act = np_(conv(x)).astype("float64")  # (3, 7, 7, 4)
    kernel = np_(model.get_layer("head").kernel)
    weights = kernel[:, t].T / (7 * 7)  # ∂ out[t] / ∂A averaged over positions, per sample
    raw = np.einsum("bhwc,bc->bhw", act, weights)
    small = np_(A.gradcam(model, x, target=t, relu=False, resize=False))
    np.testing.assert_allclose(small, raw, rtol=1e-5, atol=1e-7)
    cam = np_(A.gradcam(model, x, target=t))  # layer=None: the last spatial layer, "conv"
    np.testing.assert_allclose(cam, _zoom(np.maximum(raw, 0), (9, 9)), rtol=1e-5, atol=1e-7)


def test_gradcam_finds_the_backbone_of_a_nested_model(rng):
    keras.utils.set_random_seed(2)
    inner = keras.Input((10, 10, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inner)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="c2")(h)
    backbone = keras.Model(inner, h, name="backbone")
    outer = keras.Input((10, 10, 3))
    y = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(backbone(outer)))
    model = keras.Model(outer, y)
    x = rng.uniform(size=(2, 10, 10, 3)).astype("float32")
    by_default = np_(A.gradcam(model, x, target=3))
    by_name = np_(A.gradcam(model, x, target=3, layer="backbone/c2"))
    assert by_default.shape == (2, 10, 10)
    np.testing.assert_allclose(by_default, by_name, rtol=1e-5, atol=1e-8)


def test_gradcam_against_the_keras_io_tape_on_tensorflow(rng):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the keras.io function is written with tf.GradientTape")
    import tensorflow as tf

    model = _cnn(3)
    x = rng.uniform(size=(1, 9, 9, 2)).astype("float32")
    outputs = [model.get_layer("conv").output, model.layers[-1].output]
    grad_model = keras.Model(model.inputs, outputs)
    with tf.GradientTape() as tape:  # keras.io's make_gradcam_heatmap, unnormalised
        conv_out, preds = grad_model(x)
        score = preds[:, 1]
    grads = tape.gradient(score, conv_out)
    pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = tf.maximum(conv_out[0] @ pooled[..., tf.newaxis], 0)[..., 0].numpy()
    cam = np_(A.gradcam(model, x, target=1, layer="conv", resize=False))[0]
    np.testing.assert_allclose(cam, heatmap, rtol=1e-5, atol=1e-8)


def test_multi_input_shapes_and_baselines(rng):
    a_in, b_in = keras.Input((5,), name="a"), keras.Input((2, 3), name="b")
    h = keras.layers.Concatenate()([a_in, keras.layers.Flatten()(b_in)])
    model = keras.Model([a_in, b_in], keras.layers.Dense(3, activation="tanh")(h))
    x = [rng.normal(size=(4, 5)).astype("float32"), rng.normal(size=(4, 2, 3)).astype("float32")]
    ig, delta = A.integrated_gradients(
        model, x, target=1, baseline=[0.0, np.ones((2, 3), "float32")], return_delta=True
    )
    assert [tuple(t.shape) for t in ig] == [(4, 5), (4, 2, 3)] and tuple(delta.shape) == (4,)
    assert np.abs(np_(delta)).max() < 1e-4
    sal = A.saliency(model, x, target=np.array([0, 1, 2, 0]))
    assert [tuple(t.shape) for t in sal] == [(4, 5), (4, 2, 3)]
    assert [tuple(t.shape) for t in A.smoothgrad(model, x, target=2, samples=3, seed=0)] == [
        (4, 5),
        (4, 2, 3),
    ]


def test_batches_stream_and_concatenate(rng):
    model = _cnn()
    x = rng.uniform(size=(5, 9, 9, 2)).astype("float32")
    for fn in (A.saliency, A.integrated_gradients, A.gradcam):
        batches = iter([x[:2], (x[2:],)])  # a bare batch and an (x,) tuple, as fit accepts
        np.testing.assert_allclose(
            np_(fn(model, batches, target=1)), np_(fn(model, x, target=1)), rtol=1e-5, atol=1e-8
        )


def test_plot_writes_a_png(tmp_path, rng):
    pytest.importorskip("matplotlib")
    model = _cnn()
    x = rng.uniform(size=(2, 9, 9, 2)).astype("float32")
    maps = {"saliency": A.saliency(model, x, target=0), "grad-cam": A.gradcam(model, x, target=0)}
    fig = A.plot(x, maps, str(tmp_path / "maps.png"))
    assert (tmp_path / "maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2 * 3 + 2 * 2  # panels and colour bars
    A.plot(np.ones((1, 6)), np.arange(6.0)[None] - 2, str(tmp_path / "vec.png"), overlay=False)


def test_errors_say_what_was_received(rng):
    model = _cnn()
    x = rng.uniform(size=(2, 9, 9, 2)).astype("float32")
    with pytest.raises(ValueError, match=r"Received: baseline of shape \(9, 2\)"):
        A.integrated_gradients(model, x, target=0, baseline=np.zeros((9, 2), "float32"))
    mlp = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="spatial output.*Received: layer=None"):
        A.gradcam(mlp, np.ones((2, 4), "float32"), target=0)
    with pytest.raises(ValueError, match=r"3 targets for a batch of 2"):
        A.saliency(model, x, target=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"out of range.*from -3 to 2"):
        A.saliency(model, x, target=np.array([0, 3]))
    with pytest.raises(TypeError, match=r"Received: target=0.5"):
        A.saliency(model, x, target=0.5)
    with pytest.raises(ValueError, match=r"at least 2 steps"):
        A.integrated_gradients(model, x, target=0, steps=1, method="riemann_left")
    with pytest.raises(TypeError, match=r"Received: an input of dtype int32"):
        A.integrated_gradients(_linear(), np.ones((2, 3), "int32"), target=0)
    with pytest.raises(ValueError, match=r"riemann_middle"):
        A.integrated_gradients(model, x, target=0, method="riemann_midle")


def test_nan_inputs_are_reported_not_zeroed(rng):
    x = rng.normal(size=(2, 3)).astype("float32")
    x[1, 0] = np.nan
    ig = np_(A.integrated_gradients(_linear(), x, target=0, steps=4))
    assert np.isnan(ig[1, 0]) and np.isfinite(ig[0]).all()


def test_captum_agrees_on_torch(rng):
    if keras.backend.backend() != "torch":
        pytest.skip("Captum runs on the torch backend, where a Keras model is a torch.nn.Module")
    captum = pytest.importorskip("captum.attr")

    model = _cnn(4)
    x = rng.uniform(size=(3, 9, 9, 2)).astype("float32")
    t = np.array([1, 0, 2])
    # On Keras's device (a GPU, where there is one), as a Captum user would pass them.
    x_t, t_t = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(t)
    for method in METHODS:
        ref, ref_delta = captum.IntegratedGradients(model).attribute(
            x_t,
            baselines=0.2,
            target=t_t,
            n_steps=12,
            method=method,
            return_convergence_delta=True,
        )
        ig, delta = A.integrated_gradients(
            model, x, target=t, baseline=0.2, steps=12, method=method, return_delta=True
        )
        np.testing.assert_allclose(np_(ig), np_(ref), rtol=1e-5, atol=1e-7, err_msg=method)
        np.testing.assert_allclose(np_(delta), np_(ref_delta), atol=1e-6, err_msg=method)
    ref = captum.Saliency(model).attribute(x_t.clone().requires_grad_(), target=t_t)
    np.testing.assert_allclose(np_(A.saliency(model, x, target=t)), np_(ref), rtol=1e-6)


def test_tf_keras_vis_agrees_on_tensorflow(rng):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf-keras-vis runs on TensorFlow")
    gradcam_mod = pytest.importorskip("tf_keras_vis.gradcam")
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.scores import CategoricalScore

    model = _cnn(5)
    x = rng.uniform(size=(3, 9, 9, 2)).astype("float32")
    t = [1, 0, 2]
    ref = gradcam_mod.Gradcam(model, clone=True)(
        CategoricalScore(t), x, penultimate_layer="conv", normalize_cam=False, expand_cam=True
    )
    np.testing.assert_allclose(
        np_(A.gradcam(model, x, target=np.array(t))), ref, rtol=1e-5, atol=1e-8
    )
    np.random.seed(11)  # tf-keras-vis draws its noise from NumPy's global generator
    ref = Saliency(model, clone=True)(
        CategoricalScore(t),
        x,
        smooth_samples=4,
        smooth_noise=0.1,
        gradient_modifier=None,
        keepdims=True,
        normalize_map=False,
    )
    ours = A.smoothgrad(model, x, target=np.array(t), samples=4, noise=0.1, seed=11)
    np.testing.assert_allclose(np_(ours), ref, rtol=1e-4, atol=1e-7)
