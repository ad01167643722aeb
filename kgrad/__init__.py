"""kgrad: gradients, Jacobians and Hessians of Keras 3 models on every backend.

The transforms live in :mod:`kgrad.func`; the model-level API is added on top.
"""

from kgrad import func
from kgrad.backends import SUPPORTED as SUPPORTED_BACKENDS

__version__ = "0.1.0"

__all__ = ["func", "SUPPORTED_BACKENDS", "__version__"]
