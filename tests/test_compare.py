"""The cross-backend comparison: its arithmetic, and that it catches disagreement."""

import math

import numpy as np

from kgrad import compare, demos


def test_relative_differences_are_norm_wise_per_derivative():
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
    d = compare.relative_differences(a, b)
    assert math.isclose(d["grad/weights"], 0.5 / math.sqrt(25.25))
    assert d["hvp/weights"] == 0.0


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
