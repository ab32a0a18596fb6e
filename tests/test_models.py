import numpy as np
import pytest

from mnist_keras.models import archs, builders


def test_the_product_specification_is_registered():
    # The three models the package promises, exactly as specified (layers, parameters, optimizer rate).
    registered = {spec.name: (spec.parameters, spec.preset["learning_rate"]) for spec in archs.specs()}
    assert registered == {"mlp": (105_214, 1e-3), "mlp_small": (42_310, 1e-2), "cnn": (21_840, 6e-3)}


@pytest.mark.parametrize("arch", archs.names())
def test_parameter_counts_and_outputs(arch):
    model = builders.build_model(arch)
    assert model.count_params() == archs.get(arch).parameters
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28)).astype("float32")
    probabilities = np.asarray(model(pixels))
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities >= 0).all()


@pytest.mark.parametrize("arch", archs.names())
def test_every_layer_is_named_and_scaling_is_inside(arch):
    model = builders.build_model(arch)
    names = [layer.name for layer in model.layers]
    assert names[:2] == ["pixels", "rescale"] and names[-1] == "probabilities"
    assert len(set(names)) == len(names)


def test_cnn_layer_shapes():
    model = builders.build_model("cnn")
    assert model.get_layer("flatten").output.shape == (None, 320)
    assert model.get_layer("conv_1").kernel.shape == (5, 5, 1, 10)
    assert model.get_layer("conv_2").kernel.shape == (5, 5, 10, 20)


def test_builders_take_other_sizes():
    assert builders.build_model("mlp", hidden_units=(32,)).count_params() == 784 * 32 + 32 + 33 * 10
    assert builders.build_model("cnn", filters=(4, 8), dense_units=16).get_layer("dense_1").units == 16


@pytest.mark.parametrize("arch, kwargs", [
    ("mlp", {"hidden_units": (0, 10)}),
    ("mlp", {"hidden_units": ()}),
    ("cnn", {"filters": (10,)}),
    ("cnn", {"kernel_size": 9}),
    ("cnn", {"dense_units": -1}),
])
def test_bad_hyperparameters_raise(arch, kwargs):
    with pytest.raises(ValueError, match="Received"):
        builders.build_model(arch, **kwargs)


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="Received: arch='resnet'"):
        builders.build_model("resnet")


def test_compiled_with_sparse_categorical_crossentropy():
    model = builders.compile_model(builders.build_model("mlp_small"), 1e-2)
    assert model.loss.__class__.__name__ == "SparseCategoricalCrossentropy"
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-2)
