"""The annotator contract the annotate job relies on: registry, input checks, output shape, spec,
pickling by construction arguments, and runtime parameters."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import annotators
from annotators import create

WEIGHTLESS = ["canny", "content_shuffle", "lineart_standard"]


def test_registry_lists_every_builtin_annotator():
    assert set(annotators.available()) >= {
        "canny",
        "content_shuffle",
        "lineart_standard",
        "hed",
        "midas",
        "openpose",
        "mlsd",
        "lineart",
        "normalbae",
    }


def test_unknown_name_is_a_clear_error_listing_what_exists():
    with pytest.raises(ValueError) as err:
        create("nope")
    message = str(err.value)
    assert "'nope'" in message
    assert all(name in message for name in annotators.available())


def test_unknown_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="canny.*bad parameters.*sigma"):
        create("canny", sigma=3)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 64, 64, 3), np.float32),  # wrong dtype
        np.zeros((64, 64, 3), np.uint8),  # no batch axis
        np.zeros((2, 64, 64, 4), np.uint8),  # RGBA
        np.zeros((2, 64, 64), np.uint8),  # grey
    ],
)
def test_wrong_input_dtype_or_shape_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"canny: expected uint8 images of shape \(N, H, W, 3\), got"):
        create("canny")(bad)


def test_size_not_a_multiple_of_the_network_stride_is_a_clear_error(random_weights):
    lineart = create("lineart", weights_source=str(random_weights("sk_model.pth")), device="cpu")
    with pytest.raises(ValueError, match="multiples of 4.*66x64"):
        lineart(np.zeros((1, 66, 64, 3), np.uint8))


@pytest.mark.parametrize("name", WEIGHTLESS)
def test_weightless_output_has_the_input_size_and_declared_channels(name, photos):
    annotator = create(name)
    images = photos(48, 80, n=2)  # no multiple-of-64 requirement without a network
    out = annotator(images)
    assert out.dtype == np.uint8 and out.shape == (2, 48, 80, annotator.channels)
    assert annotator(images[:0]).shape == (0, 48, 80, annotator.channels)


def test_read_only_batches_are_accepted(random_weights, photos):
    images = photos(64, 64, n=2)
    images.setflags(write=False)  # as Ray Data hands them out
    lineart = create("lineart", weights_source=str(random_weights("sk_model.pth")), device="cpu")
    assert lineart(images).shape == (2, 64, 64, 1)


def test_spec_records_what_makes_the_map_and_not_how_it_ran(random_weights):
    from annotators.weights import sha256_file

    directory = random_weights("ControlNetHED.pth")
    hed = create("hed", scribble=True, weights_source=str(directory), device="cpu", batch_size=4)
    spec = hed.spec()
    json.dumps(spec)  # goes into Parquet metadata and MLflow
    assert spec["name"] == "hed" and spec["channels"] == 1 and spec["commercial_use"] is True
    assert spec["params"] == {"safe": False, "scribble": True}  # device / batch size do not change the map
    assert spec["weights"]["source"] == str(directory)
    assert spec["weights"]["sha256"] == {"ControlNetHED.pth": sha256_file(directory / "ControlNetHED.pth")}
    assert create("canny", low_threshold=10).spec()["params"] == {"low_threshold": 10, "high_threshold": 200}


def test_openpose_declares_its_non_commercial_licence():
    from annotators.openpose import OpenPose

    assert OpenPose.commercial_use is False and "non-commercial" in OpenPose.weights.licence


def test_pickles_by_construction_arguments_and_rebuilds(random_weights, photos):
    directory = random_weights("sk_model.pth")
    lineart = create("lineart", weights_source=str(directory), device="cpu", batch_size=2)
    data = pickle.dumps(lineart)
    assert len(data) < 2000  # arguments only, not the 17 MB of weights
    copy = pickle.loads(data)
    images = photos(64, 64, n=2)
    np.testing.assert_array_equal(copy(images), lineart(images))
    assert copy.spec() == lineart.spec()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"device": "no-such-device"}, "is not a torch device"),
    ],
)
def test_bad_runtime_parameters_are_clear_errors(params, message, random_weights):
    with pytest.raises(ValueError, match=message):
        create("lineart", weights_source=str(random_weights("sk_model.pth")), **params)


def test_default_device_is_cuda_when_available_else_cpu():
    import torch

    from annotators.network import pick_device

    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
