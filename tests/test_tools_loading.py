"""What the command line reads: batch files (never pickles), custom-object modules, progress."""

import io
import os

import keras
import numpy as np
import pytest

import kgrad
from kgrad import _progress
from kgrad.tools import _loading

L = keras.layers


def _two_inputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    out = L.Dense(1, name="o")(L.Concatenate()([a, b]))
    return keras.Model([a, b], out)


def test_npy_npz_and_csv_batches(tmp_path, rng):
    x = rng.normal(size=(4, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(_loading.load_batch(str(tmp_path / "x.npy")), x)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    np.testing.assert_allclose(_loading.load_batch(str(tmp_path / "x.csv")), x, rtol=1e-6)
    with open(tmp_path / "h.csv", "w") as fh:  # a header line
        fh.write("u,v,w\n" + "\n".join(",".join(map(str, row)) for row in x.tolist()))
    np.testing.assert_allclose(_loading.load_batch(str(tmp_path / "h.csv")), x, rtol=1e-6)
    # One flattened sample per CSV row, reshaped to a single input's sample shape.
    image = keras.Sequential([keras.Input((2, 3)), L.Flatten(), L.Dense(1)])
    flat = rng.normal(size=(2, 6)).astype("float32")
    np.savetxt(tmp_path / "flat.csv", flat, delimiter=",")
    got = _loading.load_batch(str(tmp_path / "flat.csv"), image)
    np.testing.assert_allclose(got, flat.reshape(2, 2, 3), rtol=1e-6)


def test_npz_arrays_are_matched_to_input_names(tmp_path, rng):
    model = _two_inputs()
    a = rng.normal(size=(4, 3)).astype("float32")
    b = rng.normal(size=(4, 2)).astype("float32")
    np.savez(tmp_path / "named.npz", b=b, a=a)  # saved out of order
    got = _loading.load_batch(str(tmp_path / "named.npz"), model)
    np.testing.assert_array_equal(got[0], a)
    np.testing.assert_array_equal(got[1], b)
    np.savez(tmp_path / "positional.npz", x0=a, x1=b)
    got = _loading.load_batch(str(tmp_path / "positional.npz"), model)
    np.testing.assert_array_equal(got[1], b)
    np.savez(tmp_path / "wrong.npz", first=a, second=b)
    with pytest.raises(
        ValueError, match=r"\['first', 'second'\] for inputs named \['a', 'b'\]"
    ) as err:
        _loading.load_batch(str(tmp_path / "wrong.npz"), model)
    assert "np.savez('wrong.npz', a=..., b=...)" in str(err.value)


def test_other_formats_and_pickles_are_refused(tmp_path):
    (tmp_path / "x.txt").write_text("1,2,3\n")
    with pytest.raises(ValueError, match=r"reads \.npy, \.npz, \.csv files. Received: .*x\.txt"):
        _loading.load_batch(str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="No such file"):
        _loading.load_batch(str(tmp_path / "missing.npy"))
    # An object array is a pickle: loading it could run code. It must not be loaded.
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.npy", "wb") as fh:
        np.lib.format.write_array(fh, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="never loads") as err:
        _loading.load_batch(str(tmp_path / "evil.npy"))
    assert "allow_pickle=" not in str(err.value) and not marker.exists()
    with open(tmp_path / "evil.npz", "wb") as fh:
        np.savez(fh, x=np.array([Payload()], dtype=object))
    with pytest.raises(ValueError, match="never loads"):
        _loading.load_batch(str(tmp_path / "evil.npz"))
    assert not marker.exists()
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="not numbers"):
        _loading.load_batch(str(tmp_path / "strings.npy"))


def test_import_and_custom_objects_specs(tmp_path, monkeypatch):
    (tmp_path / "extra_objects.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.chdir(tmp_path)
    objects = _loading.custom_objects(["extra_objects:twice"])
    assert objects["twice"](3) == 6
    assert (
        _loading.absolute("extra_objects.py:twice") == f"{tmp_path}{os.sep}extra_objects.py:twice"
    )
    with pytest.raises(ValueError, match="MODULE:NAME"):
        _loading.custom_objects(["extra_objects"])
    with pytest.raises(ValueError, match="has no object 'thrice'"):
        _loading.custom_objects(["extra_objects:thrice"])
    with pytest.raises(ValueError, match="Could not import 'no_such_module_here'"):
        _loading.import_modules(["no_such_module_here"])


def test_progress_without_a_terminal_writes_plain_lines(capsys):
    out = io.StringIO()  # not a TTY
    bar = _progress.Progress(25, "batch", stream=out, label="kgrad: ")
    for i in range(1, 26):
        bar.update(i)
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\b" not in text
    lines = text.splitlines()
    assert lines[-1] == "kgrad: 25/25 batches" and 2 <= len(lines) <= 11
    # A stream of batches: kgrad's own progress on (captured, non-TTY) stdout.
    model = keras.Sequential([keras.Input((2,)), L.Dense(1)])

    class Batches:  # a sized iterable of batches
        def __len__(self):
            return 3

        def __iter__(self):
            return iter([np.ones((2, 2), "float32")] * 3)

    g = kgrad.grad(model, Batches())
    assert tuple(g.shape) == (6, 2)
    captured = capsys.readouterr().out
    assert "\x1b" not in captured and "\r" not in captured
    assert captured.splitlines()[-1] == "3/3 batches"
