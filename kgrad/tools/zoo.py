"""The architecture zoo for ``kgrad compare --zoo``: real Keras architectures.

Each entry is a function ``rng -> (model, x, y, extra)``: a built model with
random but deterministic weights (BatchNormalization statistics randomised too),
an input batch, one-hot targets for the loss, and ``extra`` with

- ``target``: the class whose score saliency and Grad-CAM differentiate;
- ``activations``: layers (nested names such as ``"backbone/Conv_1"`` allowed)
  whose output gradient is compared, Grad-CAM style;
- ``loss``: the loss whose weight gradients are compared (logits in, so
  ``categorical_crossentropy`` with ``from_logits=True``, or ``mse``);
- ``layer_grad``: whether ``kgrad.layer_grad`` is compared too.

The zoo holds every ``keras.applications`` family that builds at a small input
size on CPU (MobileNet V1/V2/V3, ResNet, ResNetV2, EfficientNet, EfficientNetV2,
DenseNet, ConvNeXt, NASNet, Xception, Inception, VGG) and hand-written RNN,
attention, Embedding, U-Net, multi-input, nested and subclassed models.
``CI`` is the subset the ``cross`` tox env runs; ``KGRAD_ZOO=full`` or the
``zoo`` tox env runs all of them.

Example:

>>> from kgrad.tools import zoo
>>> len(zoo.ARCHITECTURES) >= 20, set(zoo.CI) <= set(zoo.ARCHITECTURES)
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

L = keras.layers
A = keras.applications

#: The loss on logits that classifier entries use.
LOGITS_CCE = "categorical_crossentropy_from_logits"


def loss_from_name(name: str):
    """The Keras loss for a zoo loss name (``LOGITS_CCE`` or any Keras loss name)."""
    if name == LOGITS_CCE:
        return keras.losses.CategoricalCrossentropy(from_logits=True)
    return keras.losses.get(name)


def _randomize_bn(model: keras.Model, rng: np.random.Generator) -> None:
    """Gives every BatchNormalization layer (nested ones too) non-trivial statistics."""
    from kgrad._layers import _all_layers

    for layer in _all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=n).astype("float32") * 0.1)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=n).astype("float32"))


def _spatial_layers(model: keras.Model) -> list[str]:
    """Grad-CAM's layers: one halfway through and the last with a 4-D output
    (batch, height, width, channels)."""
    names = [
        layer.name
        for layer in model.layers
        if not isinstance(layer, L.InputLayer) and len(getattr(layer.output, "shape", ())) == 4
    ]
    return [names[len(names) // 2], names[-1]]


def _onehot(rng, n, classes=3):
    return np.eye(classes, dtype="float32")[rng.integers(0, classes, size=n)]


def _application(builder: Callable, size: int, **kwargs) -> Callable:
    """An entry for a ``keras.applications`` builder at ``size x size`` with 3 classes."""

    def build(rng):
        model = builder(
            input_shape=(size, size, 3),
            weights=None,
            classes=3,
            classifier_activation=None,
            **kwargs,
        )
        _randomize_bn(model, rng)
        x = rng.uniform(-1, 1, size=(2, size, size, 3)).astype("float32")
        extra = {
            "target": 1,
            "activations": _spatial_layers(model),
            "loss": LOGITS_CCE,
            "layer_grad": False,
        }
        return model, x, _onehot(rng, 2), extra

    build.__doc__ = f"keras.applications.{builder.__name__} at {size}x{size}, random weights."
    return build


def lstm_stack(rng):
    """Two stacked LSTMs on float sequences."""
    model = keras.Sequential(
        [
            keras.Input((6, 4)),
            L.LSTM(8, return_sequences=True, name="lstm1"),
            L.LSTM(6, name="lstm2"),
            L.Dense(3, name="logits"),
        ],
        name="lstm_stack",
    )
    x = rng.normal(size=(3, 6, 4)).astype("float32")
    extra = {"target": 2, "activations": ["lstm1"], "loss": LOGITS_CCE, "layer_grad": True}
    return model, x, _onehot(rng, 3), extra


def bigru_text(rng):
    """Embedding + bidirectional GRU on token ids: gradients reach the embedding output."""
    model = keras.Sequential(
        [
            keras.Input((7,), dtype="int32"),
            L.Embedding(30, 8, name="emb"),
            L.Bidirectional(L.GRU(6), name="bigru"),
            L.Dense(3, name="logits"),
        ],
        name="bigru_text",
    )
    x = rng.integers(0, 30, size=(3, 7)).astype("int32")
    extra = {"target": 0, "activations": ["emb"], "loss": LOGITS_CCE, "layer_grad": True}
    return model, x, _onehot(rng, 3), extra


def rnn_timedistributed(rng):
    """SimpleRNN sequences through a TimeDistributed Dense, pooled."""
    model = keras.Sequential(
        [
            keras.Input((5, 3)),
            L.SimpleRNN(6, return_sequences=True, name="rnn"),
            L.TimeDistributed(L.Dense(4, activation="tanh"), name="td"),
            L.GlobalAveragePooling1D(name="gap"),
            L.Dense(3, name="logits"),
        ],
        name="rnn_timedistributed",
    )
    x = rng.normal(size=(3, 5, 3)).astype("float32")
    extra = {"target": 1, "activations": ["td"], "loss": LOGITS_CCE, "layer_grad": True}
    return model, x, _onehot(rng, 3), extra


@keras.saving.register_keras_serializable(package="kgrad_zoo")
class AddPosition(L.Layer):
    """Adds a learned position embedding of shape ``(length, dim)`` to its input."""

    def build(self, input_shape):
        self.position = self.add_weight(
            shape=tuple(input_shape[1:]), initializer="random_normal", name="position"
        )

    def call(self, x):
        return x + self.position


def transformer_text(rng):
    """A transformer encoder block on token ids: embedding, positions, attention, FFN."""
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    h = AddPosition(name="pos")(L.Embedding(40, 8, name="emb")(tokens))
    att = L.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.1, name="mha")(h, h)
    h = L.LayerNormalization(name="ln1")(L.Add(name="res1")([h, att]))
    ff = L.Dense(8, name="ff2")(L.Dense(16, activation="gelu", name="ff1")(h))
    h = L.LayerNormalization(name="ln2")(L.Add(name="res2")([h, L.Dropout(0.1)(ff)]))
    out = L.Dense(3, name="logits")(L.GlobalAveragePooling1D(name="gap")(h))
    model = keras.Model(tokens, out, name="transformer_text")
    x = rng.integers(0, 40, size=(3, 6)).astype("int32")
    extra = {"target": 1, "activations": ["emb", "mha"], "loss": LOGITS_CCE, "layer_grad": True}
    return model, x, _onehot(rng, 3), extra


def text_cnn(rng):
    """Embedding + Conv1D + global max pooling, the classic text classifier."""
    model = keras.Sequential(
        [
            keras.Input((10,), dtype="int32"),
            L.Embedding(25, 6, name="emb"),
            L.Conv1D(8, 3, activation="relu", name="conv"),
            L.GlobalMaxPooling1D(name="gmp"),
            L.Dense(3, name="logits"),
        ],
        name="text_cnn",
    )
    x = rng.integers(0, 25, size=(3, 10)).astype("int32")
    extra = {"target": 2, "activations": ["emb", "conv"], "loss": LOGITS_CCE, "layer_grad": True}
    return model, x, _onehot(rng, 3), extra


def unet_small(rng):
    """A two-level U-Net: Conv2D, pooling, Conv2DTranspose and a skip connection."""
    inp = keras.Input((16, 16, 2), name="image")
    c1 = L.Conv2D(4, 3, padding="same", activation="relu", name="enc1")(inp)
    p1 = L.MaxPooling2D(2, name="pool")(c1)
    c2 = L.Conv2D(8, 3, padding="same", activation="relu", name="enc2")(p1)
    c2 = L.BatchNormalization(name="bn")(c2)
    u1 = L.Conv2DTranspose(4, 2, strides=2, name="up")(c2)
    d1 = L.Conv2D(4, 3, padding="same", activation="tanh", name="dec")(
        L.Concatenate(name="skip")([u1, c1])
    )
    out = L.Conv2D(2, 1, name="mask")(d1)
    model = keras.Model(inp, out, name="unet_small")
    _randomize_bn(model, rng)
    x = rng.normal(size=(2, 16, 16, 2)).astype("float32")
    y = rng.normal(size=(2, 16, 16, 2)).astype("float32")
    # target: the mask logit of class 1 at pixel (8, 8) of each sample.
    extra = {"target": (8, 8, 1), "activations": ["enc2"], "loss": "mse", "layer_grad": True}
    return model, x, y, extra


def multi_input(rng):
    """Two inputs, an image branch and a tabular branch, merged."""
    image = keras.Input((12, 12, 3), name="image")
    table = keras.Input((5,), name="table")
    a = L.Conv2D(4, 3, activation="relu", name="conv")(image)
    a = L.GlobalAveragePooling2D(name="gap")(a)
    b = L.Dense(6, activation="tanh", name="dense_tab")(table)
    h = L.Concatenate(name="merge")([a, b])
    out = L.Dense(3, name="logits")(L.Dense(8, activation="relu", name="joint")(h))
    model = keras.Model([image, table], out, name="multi_input")
    x = [
        rng.normal(size=(3, 12, 12, 3)).astype("float32"),
        rng.normal(size=(3, 5)).astype("float32"),
    ]
    extra = {"target": 0, "activations": ["conv", "merge"], "loss": LOGITS_CCE, "layer_grad": True}
    return model, x, _onehot(rng, 3), extra


def nested_transfer(rng):
    """Transfer learning: MobileNetV2 as a nested backbone inside a classifier."""
    backbone = A.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None, name="backbone"
    )
    inp = keras.Input((32, 32, 3), name="image")
    h = L.GlobalAveragePooling2D(name="gap")(backbone(inp))
    out = L.Dense(3, name="logits")(L.Dropout(0.2, name="drop")(h))
    model = keras.Model(inp, out, name="nested_transfer")
    _randomize_bn(model, rng)
    x = rng.uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")
    extra = {
        "target": 2,
        "activations": ["backbone/Conv_1", "backbone"],
        "loss": LOGITS_CCE,
        "layer_grad": True,
    }
    return model, x, _onehot(rng, 2), extra


def nested_sequential(rng):
    """Sequential blocks nested two levels deep inside a Functional model."""
    block = keras.Sequential(
        [L.Dense(6, activation="tanh", name="d1"), L.LayerNormalization(name="ln")],
        name="block",
    )
    encoder = keras.Sequential(
        [keras.Input((4,)), block, L.Dense(5, activation="relu", name="d2")], name="encoder"
    )
    inp = keras.Input((4,), name="features")
    out = L.Dense(3, name="logits")(encoder(inp))
    model = keras.Model(inp, out, name="nested_sequential")
    x = rng.normal(size=(4, 4)).astype("float32")
    extra = {
        "target": 1,
        "activations": ["encoder/block/d1", "encoder"],
        "loss": LOGITS_CCE,
        "layer_grad": True,
    }
    return model, x, _onehot(rng, 4), extra


@keras.saving.register_keras_serializable(package="kgrad_zoo")
class ResidualMLP(keras.Model):
    """A subclassed model: residual Dense blocks with LayerNormalization."""

    def __init__(self, width: int = 8, classes: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.width, self.classes = width, classes
        self.stem = L.Dense(width, name="stem")
        self.block1 = L.Dense(width, activation="gelu", name="block1")
        self.norm = L.LayerNormalization(name="norm")
        self.block2 = L.Dense(width, activation="tanh", name="block2")
        self.head = L.Dense(classes, name="head")

    def call(self, x):
        h = self.stem(x)
        h = self.norm(h + self.block1(h))
        return self.head(h + self.block2(h))

    def get_config(self):
        return {**super().get_config(), "width": self.width, "classes": self.classes}


def subclassed(rng):
    """A subclassed ``keras.Model`` (no functional graph; activations by probes)."""
    model = ResidualMLP(name="residual_mlp")
    x = rng.normal(size=(4, 5)).astype("float32")
    model(x)  # builds the variables (``model.build`` alone creates none for this class)
    extra = {"target": 0, "activations": ["block1"], "loss": LOGITS_CCE, "layer_grad": True}
    return model, x, _onehot(rng, 4), extra


def vit_tiny(rng):
    """A vision transformer: Conv2D patches, positions, attention, LayerNorm."""
    inp = keras.Input((16, 16, 3), name="image")
    patches = L.Conv2D(8, 4, strides=4, name="patchify")(inp)
    h = AddPosition(name="pos")(L.Reshape((16, 8), name="tokens")(patches))
    att = L.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(h, h)
    h = L.LayerNormalization(name="ln")(L.Add(name="res")([h, att]))
    out = L.Dense(3, name="logits")(L.GlobalAveragePooling1D(name="gap")(h))
    model = keras.Model(inp, out, name="vit_tiny")
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    extra = {
        "target": 2,
        "activations": ["patchify", "mha"],
        "loss": LOGITS_CCE,
        "layer_grad": True,
    }
    return model, x, _onehot(rng, 2), extra


def conv3d_video(rng):
    """Conv3D + BatchNormalization on short clips."""
    model = keras.Sequential(
        [
            keras.Input((4, 8, 8, 1)),
            L.Conv3D(4, 3, padding="same", name="conv3d"),
            L.BatchNormalization(name="bn"),
            L.Activation("relu", name="relu"),
            L.GlobalAveragePooling3D(name="gap"),
            L.Dense(3, name="logits"),
        ],
        name="conv3d_video",
    )
    _randomize_bn(model, rng)
    x = rng.normal(size=(2, 4, 8, 8, 1)).astype("float32")
    extra = {"target": 0, "activations": ["relu"], "loss": LOGITS_CCE, "layer_grad": True}
    return model, x, _onehot(rng, 2), extra


#: name -> builder, in report order.
ARCHITECTURES: dict[str, Callable] = {
    "MobileNet": _application(A.MobileNet, 32, alpha=0.25),
    "MobileNetV2": _application(A.MobileNetV2, 32, alpha=0.35),
    "MobileNetV3Small": _application(
        A.MobileNetV3Small, 32, alpha=0.75, include_preprocessing=False
    ),
    "MobileNetV3Large": _application(
        A.MobileNetV3Large, 32, minimalistic=True, include_preprocessing=False
    ),
    "ResNet50": _application(A.ResNet50, 32),
    "ResNet50V2": _application(A.ResNet50V2, 32),
    "EfficientNetB0": _application(A.EfficientNetB0, 32),
    "EfficientNetV2B0": _application(A.EfficientNetV2B0, 32, include_preprocessing=False),
    "DenseNet121": _application(A.DenseNet121, 32),
    "ConvNeXtTiny": _application(A.ConvNeXtTiny, 32, include_preprocessing=False),
    "NASNetMobile": _application(A.NASNetMobile, 32),
    "Xception": _application(A.Xception, 71),
    "InceptionV3": _application(A.InceptionV3, 75),
    "InceptionResNetV2": _application(A.InceptionResNetV2, 75),
    "VGG16": _application(A.VGG16, 32),
    "lstm_stack": lstm_stack,
    "bigru_text": bigru_text,
    "rnn_timedistributed": rnn_timedistributed,
    "transformer_text": transformer_text,
    "text_cnn": text_cnn,
    "unet_small": unet_small,
    "multi_input": multi_input,
    "nested_transfer": nested_transfer,
    "nested_sequential": nested_sequential,
    "subclassed": subclassed,
    "vit_tiny": vit_tiny,
    "conv3d_video": conv3d_video,
}

#: The subset the ``cross`` tox env runs in CI (small, quick to build). The
#: recurrent, text-CNN, nested-Sequential and subclassed architectures are
#: compared across backends by ``tox -e zoo``; in CI the test suites cover them
#: per backend. MobileNet (V1) is left to ``tox -e zoo`` for CI's time: the
#: nested MobileNetV2 backbone here covers its depthwise, BatchNormalization
#: and ReLU6 layers across backends.
CI = (
    "lstm_stack",
    "transformer_text",
    "unet_small",
    "multi_input",
    "nested_transfer",
    "vit_tiny",
)
