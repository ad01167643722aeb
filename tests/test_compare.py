"""The cross-backend comparison: its arithmetic, and that it catches disagreement."""

import math

import numpy as np
import pytest

import kgrad
from kgrad.tools import compare, demos


def test_differences_are_per_array_and_name_the_array():
    a = {
        "grad/weights/x": np.array([3.0, 4.0]),
        "grad/weights/y": np.array([0.0]),
        "hvp/weights/x": np.array([1.0]),
    }
    b = {
        "grad/weights/x": np.array([3.0, 4.0]),
        "grad/weights/y": np.array([0.5]),
        "hvp/weights/x": np.array([1.0]),
    }
    # y alone: ||0 - 0.5|| / max(0, 0.5, 1e-2 * ||(3, 4, 0.5)||) = 1.
    assert compare.tensor_differences(a, b) == {
        "grad/weights": (1.0, "grad/weights/y"),
        "hvp/weights": (0.0, "hvp/weights/x"),
    }
    assert compare.relative_differences(a, b) == {"grad/weights": 1.0, "hvp/weights": 0.0}


def test_an_error_in_a_small_tensor_is_caught():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(100, 100))  # norm about 100
    bias = rng.normal(size=100) * 0.05  # norm about 0.5
    ref = {"grad/weights/d/kernel": kernel, "grad/weights/d/bias": bias}
    other = {"grad/weights/d/kernel": kernel, "grad/weights/d/bias": bias * 1.1}
    # In the norm of all the arrays together, the bias's 10% error vanishes ...
    a = np.concatenate([kernel.ravel(), bias])
    b = np.concatenate([kernel.ravel(), 1.1 * bias])
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < compare.TOLERANCE
    # ... compared on its own (at no less than 1e-2 of the derivative's norm), it
    # is caught and named.
    diff, key = compare.tensor_differences(ref, other)["grad/weights"]
    assert key == "grad/weights/d/bias"
    scale = max(np.linalg.norm(1.1 * bias), compare.TENSOR_FLOOR * np.linalg.norm(b))
    np.testing.assert_allclose(diff, np.linalg.norm(0.1 * bias) / scale, rtol=1e-12)
    assert diff > 10 * compare.TOLERANCE
    table = compare.compare({"jax": {"m": ref}, "torch": {"m": other}}, worst=(worst := {}))
    assert table["m"]["grad/weights"]["torch"] > compare.TOLERANCE
    assert "grad/weights/d/bias" in compare.format_table(table, "jax", worst=worst)
    # Rounding noise in an array far smaller than its derivative is no disagreement.
    noisy = {"grad/weights/d/kernel": kernel, "grad/weights/d/bias": bias * 0 + 1e-9}
    quiet = {"grad/weights/d/kernel": kernel, "grad/weights/d/bias": bias * 0 + 3e-9}
    assert compare.relative_differences(noisy, quiet)["grad/weights"] < 1e-6


def test_nan_missing_and_misshapen_results_count_as_disagreement():
    a = {"grad/inputs/0": np.array([1.0, 2.0])}
    assert compare.relative_differences(a, {"grad/inputs/0": np.array([1.0, np.nan])}) == {
        "grad/inputs": math.inf
    }
    assert compare.relative_differences(a, {}) == {"grad/inputs": math.inf}
    assert compare.relative_differences(a, {"grad/inputs/0": np.ones(3)}) == {
        "grad/inputs": math.inf
    }


def test_table_flags_a_disagreeing_backend():
    ok = {"grad/inputs/0": np.array([1.0, 2.0])}
    bad = {"grad/inputs/0": np.array([1.0, 2.1])}
    table = compare.compare({"jax": {"m": ok}, "tensorflow": {"m": ok}, "torch": {"m": bad}})
    assert table["m"]["grad/inputs"]["tensorflow"] == 0.0
    assert table["m"]["grad/inputs"]["torch"] > compare.TOLERANCE
    text = compare.format_table(table, "jax")
    assert "torch vs jax" in text and "NO" in text


def test_demo_models_build_and_cover_the_required_kinds(rng):
    assert set(demos.DEMOS) >= {"mlp", "cnn", "lstm", "attention", "mobilenet"}
    model, x, y, extra = demos.DEMOS["lstm"](rng)
    assert x.dtype.kind == "i" and extra["activations"] == ["emb"]
    assert model(x).shape == y.shape


def test_zoo_selection_and_matrix():
    from kgrad.tools import zoo

    assert len(zoo.ARCHITECTURES) >= 20 and len(zoo.CI) >= 6
    assert compare.zoo_names("ci") == zoo.CI
    assert compare.zoo_names("full") == tuple(zoo.ARCHITECTURES)
    assert compare.zoo_names("text_cnn, vit_tiny") == ("text_cnn", "vit_tiny")
    with pytest.raises(ValueError, match=r"Received: --zoo resnet"):
        compare.zoo_names("resnet")
    table = {
        "a": {
            "saliency/inputs": {"tensorflow": 1e-7, "torch": 2e-7},
            "gradcam/conv": {"tensorflow": 3e-7, "torch": 1e-6},
            "gradcam/mha": {"tensorflow": 5e-6, "torch": 1e-7},
            "grad/weights": {"tensorflow": 1e-7, "torch": 1e-7},
        },
        "b": {"grad/weights": {"tensorflow": 0.5, "torch": 0.0}},
    }
    lines = compare.format_matrix(table).splitlines()
    assert lines[0].split()[:3] == ["architecture", "saliency", "grad-cam"]
    # The worst over backends and over layers; "-" where a kind does not apply.
    assert lines[2].split() == ["a", "2.00e-07", "5.00e-06", "1.00e-07", "-", "yes"]
    assert lines[3].split() == ["b", "-", "-", "5.00e-01", "-", "NO"]


def test_zoo_compute_on_a_multi_input_nested_model(tmp_path):
    """The zoo worker's results on a saved-and-reloaded model equal direct kgrad calls."""
    import keras

    from kgrad.tools import _worker, zoo

    rng = np.random.default_rng(0)
    for name in ("multi_input", "nested_sequential"):
        model, x, y, extra = zoo.ARCHITECTURES[name](rng)
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        x_path = compare._save_x(x, str(tmp_path / f"{name}_x"))
        loaded = keras.models.load_model(path, compile=False)
        out = _worker.compute_zoo(loaded, _worker._load_x(x_path), y, **extra)
        loss = zoo.loss_from_name(extra["loss"])
        expected = kgrad.grad(model, x, wrt="weights", y=y, loss=loss)
        # Keras may give a reloaded nested model's variables other paths (the name
        # scopes differ when it is rebuilt); they keep their order.
        paths = {
            a.path: b.path for a, b in zip(model.trainable_variables, loaded.trainable_variables)
        }
        assert {f"grad/weights/{paths[p]}" for p in expected} <= set(out)
        for p, g in expected.items():
            np.testing.assert_allclose(
                out[f"grad/weights/{paths[p]}"], keras.ops.convert_to_numpy(g), rtol=1e-6
            )
        for layer in extra["activations"]:
            g = kgrad.grad(model, x, wrt="activations", layers=layer, target=extra["target"])
            np.testing.assert_allclose(
                out[f"gradcam/{layer}"], keras.ops.convert_to_numpy(g), rtol=1e-6
            )
        assert any(k.startswith("layer_grad/") for k in out)
