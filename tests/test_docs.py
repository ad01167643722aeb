"""Every public name appears in the API reference."""

import pathlib
import textwrap

import numpy as np
import pytest

import kgrad
from kgrad import func

API = (pathlib.Path(__file__).parents[1] / "docs" / "api.md").read_text()


def test_every_public_name_is_in_the_api_reference():
    for name in kgrad.__all__:
        assert f"kgrad.{name}" in API, name
    for name in func.__all__:
        assert f"kgrad.func.{name}" in API, name
    for name in kgrad.attribution.__all__:
        assert f"kgrad.attribution.{name}" in API, name


def test_every_public_function_has_a_docstring_with_an_example():
    for obj in (
        [getattr(func, n) for n in func.__all__]
        + [getattr(kgrad, n) for n in kgrad.__all__ if callable(getattr(kgrad, n))]
        + [getattr(kgrad.attribution, n) for n in kgrad.attribution.__all__]
    ):
        doc = obj.__doc__
        assert doc and "Example:" in doc and ">>>" in doc, obj


def test_readme_example_runs(capsys):
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "-0.375" in out and "['net/out/bias', 'net/out/kernel']" in out
    assert "(16, 2, 3) (16, 3, 3) ['hidden', 'drop', 'out']" in out


def test_training_guide_runs(capsys):
    import re

    guide = (pathlib.Path(__file__).parents[1] / "docs" / "training.md").read_text()
    scope = {}
    for block in re.findall(r"```python\n(.*?)```", guide, re.S):
        exec(compile(block, "docs/training.md", "exec"), scope)
    error = float(re.search(r"max error (\S+)", capsys.readouterr().out).group(1))
    assert error < 2e-2


def test_diagnostics_guide_runs(capsys):
    import re

    guide = (pathlib.Path(__file__).parents[1] / "docs" / "diagnostics.md").read_text()
    scope = {}
    for block in re.findall(r"```python\n(.*?)```", guide, re.S):
        exec(compile(block, "docs/diagnostics.md", "exec"), scope)
    out = capsys.readouterr().out
    assert "False 0.33" in out and "caught: kgrad.check_grad found a mismatch" in out
    assert "exploding" in scope["report"].layers["d0"].flags
    assert "[1, 3]" in out


def _run_guide(name):
    import re

    guide = (pathlib.Path(__file__).parents[1] / "docs" / name).read_text()
    scope = {}
    for block in re.findall(r"```python\n(.*?)```", guide, re.S):
        block = textwrap.dedent(block)  # blocks inside list items are indented
        exec(compile(block, f"docs/{name}", "exec"), scope)
    return scope


def test_questions_guide_runs(capsys):
    _run_guide("questions.md")
    out = capsys.readouterr().out
    assert "['net/head/kernel', 'net/head/bias']" in out and "5.0" in out
    # Every check printed on the page holds.
    assert "False" not in out and out.count("True") == 5


def test_gradcam_guide_runs(capsys):
    scope = _run_guide("gradcam.md")
    out = capsys.readouterr().out
    assert "(13, 13) 1.0" in out and "(1, 32, 32)" in out and out.strip().endswith("True")
    assert scope["heatmap"].min() >= 0


def test_attribution_guide_runs(capsys, tmp_path, monkeypatch):
    # Trains a CNN on scikit-learn's bundled digits, explains four predictions and
    # checks completeness; the figure goes to the test's own folder.
    monkeypatch.chdir(tmp_path)
    scope = _run_guide("attribution.md")
    out = capsys.readouterr().out
    assert float(out.split("held-out accuracy ")[1].split()[0]) > 0.7, out
    assert "True True" in out, out
    assert (tmp_path / "explain.png").read_bytes()[:4] == b"\x89PNG"
    assert set(scope["maps"]) == {
        "saliency",
        "integrated gradients",
        "SmoothGrad",
        "Grad-CAM (conv2)",
    }


def test_getting_started_runs(capsys):
    _run_guide("getting-started.md")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "(4, 3)" and out[2:] == ["(4, 2, 3)", "(4, 3, 3)", "True"]


def test_backend_notes_example_runs(capsys):
    # The TensorFlow moments example shows the bug kgrad works around (it imports
    # TensorFlow directly, whatever the Keras backend; every test env has it).
    pytest.importorskip("tensorflow")
    _run_guide("backends.md")
    out = capsys.readouterr().out
    assert "0.666" in out and "-0.222" not in out  # the diagonal only: the documented bug


def test_pinn_guide_runs(capsys):
    # Heat, Poisson and beam problems trained through kgrad's operators in `fit`,
    # each to a stated error against its closed-form solution.
    scope = _run_guide("pinn.md")
    out = capsys.readouterr().out
    assert scope["heat_error"] < 0.05, out
    assert scope["poisson_error"] < 0.15, out
    assert scope["beam_error"] < 0.25, out
    assert "5 True" in out
    # The stochastic Laplacian: one estimate within 0.6, the mean of 20 within 0.2.
    assert scope["relative"] < 0.6 and scope["mean_error"] < 0.2, out
    losses = scope["losses"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], out


def test_samples_guide_runs(capsys, tmp_path, monkeypatch):
    # Noisy digits, DP-SGD and the sharpness during training; figures in the test's folder.
    monkeypatch.chdir(tmp_path)
    scope = _run_guide("samples.md")
    out = capsys.readouterr().out
    # The mislabelled samples carry the large norms (about 90% of the 150 largest).
    assert scope["found"] > 0.7, out
    norms, is_flipped = scope["norms"], scope["is_flipped"]
    assert np.median(norms[is_flipped]) > 3 * np.median(norms[~is_flipped]), out
    assert "True" in out  # the ghost norms are the norms of the per-sample gradients
    assert scope["dp_accuracy"] > 0.75, out
    values = scope["sharpness"].values
    assert len(values) == 13 and min(values) > 0, out
    # Above 2 / lr at the start, then driven to about 2 / lr = 2.
    assert values[0] > 2.0 and 1.5 < np.mean(values[-4:]) < 2.8, out
    # The eigenvector's direction: the loss's second difference is the eigenvalue.
    assert abs(scope["second"] - scope["values"][0]) < 0.02 * scope["values"][0], out
    assert scope["smallest"][0] < 0 < scope["largest"][0], out
    assert np.isclose(scope["largest"][0], scope["values"][0], rtol=1e-3), out
    assert 0 < scope["error"] < 0.2 * scope["trace"], out
    for name in ("samples.png", "sharpness.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
