"""Root pytest configuration: doctests import only the active backend's module."""

import os

_active = os.environ.get("KERAS_BACKEND", "tensorflow")
collect_ignore = [
    f"kgrad/backends/{name}.py" for name in ("jax", "tensorflow", "torch") if name != _active
]
