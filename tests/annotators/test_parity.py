"""Our batched annotators against controlnet-aux's own per-image detectors, on the same input and
(for networks) the same weights.

controlnet-aux resizes to ``detect_resolution`` (short side, sides rounded to multiples of 64) and
then to ``image_resolution``; we never resize. Inputs here are non-square with sides that are
multiples of 64, and controlnet-aux is called with both resolutions equal to the short side, so its
resizes are the identity and the outputs must agree.

Exactness: on CPU, oneDNN picks convolution kernels by batch size, so a batch of 3 and three
batches of 1 differ in the last float bits (~1e-8), which can move a uint8 by one level. The
parity tests therefore turn oneDNN off (PyTorch's own convolution is batch-invariant) and demand
bitwise equality; ``test_batching_with_onednn_changes_at_most_rounding`` covers the default backend.
NormalBAE is checked bitwise one image at a time and within one level batched: its EfficientNet's
squeeze-excite averages over H*W in an order that depends on the batch shape (float sums are not
associative), with or without oneDNN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from annotators import create
from annotators.shuffle import image_seed


def per_image(detector, images: np.ndarray, **kwargs) -> np.ndarray:
    """controlnet-aux, one image at a time, with its resizes made the identity."""
    r = min(images.shape[1:3])
    return np.stack(
        [detector(image, detect_resolution=r, image_resolution=r, output_type="np", **kwargs) for image in images]
    )


def as_channels(reference: np.ndarray, channels: int) -> np.ndarray:
    """controlnet-aux returns 3 equal channels for grey maps; we store one."""
    if channels == 1:
        assert (reference == reference[..., :1]).all()
        return reference[..., :1]
    return reference


def assert_informative(reference: np.ndarray) -> None:
    # A map with one value everywhere would make the comparison vacuous.
    assert all(len(np.unique(m)) > 1 for m in reference), "reference maps are blank: the test proves nothing"


# ------------------------------------------------------------------------------------------------
# Weightless
# ------------------------------------------------------------------------------------------------


def test_canny_matches_controlnet_aux(photos):
    from controlnet_aux import CannyDetector

    images = photos(64, 128)
    ours = create("canny", low_threshold=50, high_threshold=150)(images)
    reference = per_image(CannyDetector(), images, low_threshold=50, high_threshold=150)
    assert_informative(reference)
    np.testing.assert_array_equal(ours, as_channels(reference, 1))


def test_lineart_standard_matches_controlnet_aux(photos):
    from controlnet_aux import LineartStandardDetector

    images = photos(64, 128)
    ours = create("lineart_standard", gaussian_sigma=4.0, intensity_threshold=6)(images)
    detector = LineartStandardDetector()
    reference = np.stack(
        [
            detector(image, guassian_sigma=4.0, intensity_threshold=6, detect_resolution=64, output_type="np")
            for image in images
        ]
    )
    assert_informative(reference)
    np.testing.assert_array_equal(ours, as_channels(reference, 1))


def test_content_shuffle_matches_controlnet_aux_given_the_same_random_state(photos):
    from controlnet_aux import ContentShuffleDetector

    images = photos(64, 128)
    ours = create("content_shuffle", seed=7, noise_period=32)(images)
    for image, out in zip(images, ours):
        np.random.seed(image_seed(7, image))  # controlnet-aux draws from NumPy's global state
        reference = ContentShuffleDetector()(image, f=32, detect_resolution=64, image_resolution=64, output_type="np")
        np.testing.assert_array_equal(out, reference)
        assert not np.array_equal(out, image)


def test_content_shuffle_is_reproducible_whatever_the_batch(photos):
    images = photos(64, 128)
    shuffle = create("content_shuffle", seed=3)
    together = shuffle(images)
    alone_reversed = np.concatenate([shuffle(images[i : i + 1]) for i in reversed(range(len(images)))])[::-1]
    np.testing.assert_array_equal(together, alone_reversed)
    np.testing.assert_array_equal(together, create("content_shuffle", seed=3)(images))
    assert not np.array_equal(together, create("content_shuffle", seed=4)(images))


# ------------------------------------------------------------------------------------------------
# Networks: same random weights, same input
# ------------------------------------------------------------------------------------------------


def _hed(d):
    from controlnet_aux import HEDdetector

    return HEDdetector.from_pretrained(str(d))


def _midas(d):
    from controlnet_aux import MidasDetector

    return MidasDetector.from_pretrained(str(d))


def _openpose(d):
    from controlnet_aux import OpenposeDetector
    from controlnet_aux.open_pose.body import Body

    # Body only: OpenposeDetector.from_pretrained would also load the hand and face networks.
    return OpenposeDetector(Body(str(d / "body_pose_model.pth")))


def _mlsd(d):
    from controlnet_aux import MLSDdetector

    return MLSDdetector.from_pretrained(str(d))


def _lineart(d):
    from controlnet_aux import LineartDetector

    return LineartDetector.from_pretrained(str(d))


def _normalbae(d):
    from controlnet_aux import NormalBaeDetector

    return NormalBaeDetector.from_pretrained(str(d))


# name, our params, files, controlnet-aux detector, its call kwargs, (H, W)
NETWORKS = {
    "hed": ("hed", {}, ["ControlNetHED.pth"], _hed, {}, (64, 128)),
    "hed-safe": ("hed", {"safe": True}, ["ControlNetHED.pth"], _hed, {"safe": True}, (64, 128)),
    "hed-scribble": ("hed", {"scribble": True}, ["ControlNetHED.pth"], _hed, {"scribble": True}, (64, 128)),
    "midas": ("midas", {}, ["dpt_hybrid-midas-501f0c75.pt"], _midas, {}, (64, 128)),
    # Body runs its network at 184 px high whatever the input: a narrow portrait keeps that cheap.
    "openpose": ("openpose", {}, ["body_pose_model.pth"], _openpose, {}, (192, 64)),
    "mlsd": (
        "mlsd",
        {"value_threshold": 0.3, "distance_threshold": 0.1},
        ["mlsd_large_512_fp32.pth"],
        _mlsd,
        {"thr_v": 0.3, "thr_d": 0.1},
        (64, 128),
    ),
    "lineart": ("lineart", {}, ["sk_model.pth", "sk_model2.pth"], _lineart, {}, (64, 128)),
    "lineart-coarse": (
        "lineart",
        {"coarse": True},
        ["sk_model.pth", "sk_model2.pth"],
        _lineart,
        {"coarse": True},
        (64, 128),
    ),
}


@pytest.mark.parametrize("case", list(NETWORKS))
def test_batched_network_matches_controlnet_aux_per_image(case, random_weights, photos):
    name, params, files, aux_detector, aux_kwargs, (h, w) = NETWORKS[case]
    directory = random_weights(*files)
    images = photos(h, w, n=2)
    with torch.backends.mkldnn.flags(enabled=False):
        annotator = create(name, weights_source=str(directory), device="cpu", batch_size=len(images), **params)
        ours = annotator(images)
        reference = as_channels(per_image(aux_detector(directory), images, **aux_kwargs), annotator.channels)
    assert_informative(reference)
    np.testing.assert_array_equal(ours, reference)


def test_normalbae_matches_controlnet_aux(random_weights, photos):
    # oneDNN stays on here: without it EfficientNet's depthwise convolutions take minutes on CPU.
    directory = random_weights("scannet.pt")
    images = photos(64, 128, n=2)
    reference = per_image(_normalbae(directory), images)
    one_by_one = create("normalbae", weights_source=str(directory), device="cpu", batch_size=1)(images)
    batched = create("normalbae", weights_source=str(directory), device="cpu", batch_size=2)(images)
    assert_informative(reference)
    np.testing.assert_array_equal(one_by_one, reference)  # the same computation per image: bitwise
    diff = np.abs(batched.astype(int) - reference.astype(int))  # see the module docstring
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_batching_with_onednn_changes_at_most_rounding(random_weights, photos):
    directory = random_weights("ControlNetHED.pth")
    images = photos(64, 128)
    with torch.backends.mkldnn.flags(enabled=True):
        hed = create("hed", weights_source=str(directory), device="cpu", batch_size=3)
        reference = per_image(_hed(directory), images)[..., :1]
        ours = hed(images)
    diff = np.abs(ours.astype(int) - reference.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_chunking_by_batch_size_changes_nothing(random_weights, photos):
    directory = random_weights("sk_model.pth")
    images = photos(64, 128, n=5)
    with torch.backends.mkldnn.flags(enabled=False):
        whole = create("lineart", weights_source=str(directory), device="cpu", batch_size=5)(images)
        chunked = create("lineart", weights_source=str(directory), device="cpu", batch_size=2)(images)
    np.testing.assert_array_equal(whole, chunked)
