"""Model-level errors name the function the user called; nested layers get an index."""

import keras
import numpy as np
import pytest

import kgrad

L = keras.layers
X = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")


def _integer_output():
    return keras.Sequential(
        [keras.Input((3,)), L.Dense(2), L.Lambda(lambda t: keras.ops.cast(t > 0, "int32"))]
    )


CALLS = {
    "grad": lambda m: kgrad.grad(m, X),
    "grad-weights": lambda m: kgrad.grad(m, X, wrt="weights"),
    "jacobian": lambda m: kgrad.jacobian(m, X),
    "jacobian-weights": lambda m: kgrad.jacobian(m, X, wrt="weights", per_sample=False),
    "hessian": lambda m: kgrad.hessian(m, X),
    "hessian-weights": lambda m: kgrad.hessian(m, X, wrt="weights"),
    "hvp": lambda m: kgrad.hvp(
        m, X, {v.path: np.ones(v.shape, "float32") for v in m.trainable_variables}
    ),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", sorted(CALLS))
def test_an_integer_output_is_reported_under_the_called_function(case, jit):
    public = case.split("-")[0]
    previous = kgrad.get_jit_compile()
    kgrad.set_jit_compile(jit)
    try:
        with pytest.raises(TypeError) as info:
            CALLS[case](_integer_output())
    finally:
        kgrad.set_jit_compile(previous)
    message = str(info.value)
    assert message.startswith(f"`kgrad.{public}` needs a real- or complex-valued"), message
    assert "Received: an output of dtype int32" in message
    for internal in ("kgrad.func", "jacrev", "jacfwd", "vjp"):
        assert internal not in message, message


def test_func_transforms_still_name_themselves():
    with pytest.raises(TypeError, match=r"^`kgrad.func.grad` needs"):
        kgrad.func.grad(lambda v: keras.ops.sum(keras.ops.cast(v, "int32")))(np.ones(2))


def test_layer_grad_index_of_a_nested_layer_is_its_top_level_position():
    inner = keras.Sequential([keras.Input((4,)), L.Dense(3, name="d")], name="enc")
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(4, name="first"), inner, L.Dense(1, name="last")],
        name="outer",
    )
    report = kgrad.layer_grad(model, X, layers=["first", "enc/d", "enc", "last"])
    assert [model.layers.index(model.get_layer(n)) for n in ("first", "enc", "last")] == [0, 1, 2]
    assert {name: lg.index for name, lg in report.items()} == {
        "first": 0,
        "enc/d": 1,
        "enc": 1,
        "last": 2,
    }
