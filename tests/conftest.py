import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Resets Keras's global name counters and seeds between tests."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
