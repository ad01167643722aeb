"""kgrad: gradients, Jacobians and Hessians of Keras 3 models on every backend.

The transforms live in :mod:`kgrad.func`; the model-level API is added on top.
"""

from kgrad import callbacks, func
from kgrad._compiled import clear_cache, get_jit_compile, set_jit_compile
from kgrad._memory import get_memory_budget, set_memory_budget
from kgrad._recording import differentiable
from kgrad.api import LayerGrad, grad, hessian, hvp, jacobian, layer_grad, value_and_grad
from kgrad.backends import SUPPORTED as SUPPORTED_BACKENDS
from kgrad.check import GradCheck, check_grad
from kgrad.report import GradReport, LayerStats, grad_report

__version__ = "0.1.0"

__all__ = [
    "func",
    "grad",
    "value_and_grad",
    "jacobian",
    "hessian",
    "hvp",
    "layer_grad",
    "LayerGrad",
    "check_grad",
    "GradCheck",
    "grad_report",
    "GradReport",
    "LayerStats",
    "callbacks",
    "set_memory_budget",
    "get_memory_budget",
    "set_jit_compile",
    "get_jit_compile",
    "clear_cache",
    "differentiable",
    "SUPPORTED_BACKENDS",
    "__version__",
]
