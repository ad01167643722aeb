"""What pyproject.toml promises is what the floor and newest envs install and test.

The floor env (tox -e floor, and floor-smoke in CI) installs
constraints-floor.txt; pyproject.toml's lower bounds must be exactly those
versions, or a user could install a release no test has run on.
"""

import importlib.util
import pathlib
import re

import pytest

from kgrad.backends import _internals

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if match:
            pins[match[1].lower()] = match[2]
    return pins


def _floors() -> dict[str, str]:
    """``package -> lower bound`` of every ``>=`` requirement in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    return dict(re.findall(r'"(keras|jax|tensorflow|tensorflow-cpu|torch)>=([0-9.]+)"', text))


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in re.match(r"[0-9.]+", version)[0].strip(".").split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


@pytest.mark.parametrize("package", ["keras", "jax", "tensorflow", "tensorflow-cpu", "torch"])
def test_pyproject_floors_are_the_floor_env_pins(package):
    floors, pins = _floors(), _pins("constraints-floor.txt")
    assert package in floors, f"pyproject.toml has no {package}>= bound"
    assert _release(floors[package]) == _release(pins[package]), (package, floors, pins)


def test_every_extra_names_the_same_floor():
    text = (ROOT / "pyproject.toml").read_text()
    for package in ("jax", "tensorflow", "torch"):
        bounds = set(re.findall(rf'"{package}(?:-cpu)?>=([0-9.]+)"', text))
        assert len(bounds) == 1, (package, bounds)


def test_python_floor_is_the_floor_env_python():
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'requires-python = ">=([0-9.]+)"', text)[1]
    tox = (ROOT / "tox.ini").read_text()
    assert f"base_python = python{floor}" in tox
    assert f'"Programming Language :: Python :: {floor}"' in text


@pytest.mark.parametrize("package", ["keras", "tensorflow", "torch", "jax"])
def test_the_tested_range_in_kgrad_errors_is_the_envs_range(package):
    low, high = _internals.TESTED[package]
    pin = package if package != "tensorflow" else "tensorflow-cpu"
    assert _pins("constraints-floor.txt")[pin] == low
    assert _pins("constraints-newest.txt")[pin] == high


def test_the_ci_runner_takes_a_subset_of_backends():
    spec = importlib.util.spec_from_file_location("parallel", ROOT / ".ci" / "parallel.py")
    parallel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parallel)
    cross, backends, jobs, logs, rest = parallel._parse(
        ["--backends", "jax,tensorflow", "--jobs", "2", "tests/test_api_mlp.py"]
    )
    assert (cross, backends, jobs, logs, rest) == (
        False,
        ("jax", "tensorflow"),
        2,
        None,
        ["tests/test_api_mlp.py"],
    )
    names = [name for name, _, _ in parallel._parts(False, backends, ["-q"])]
    assert names == ["jax", "tensorflow"]
    with pytest.raises(SystemExit, match="--backends takes"):
        parallel._parse(["--backends", "jax,numpy"])
