"""Fidelity scores on hand-made maps with known answers (identical, disjoint, inverted, blank), for
every metric of both protocols, and the Fill50K mask IoU."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipelines import fidelity_metrics
from pipelines.data.synthetic import fill50k
from pipelines.fidelity import Scoring
from pipelines.fidelity_metrics import (
    canny_f1,
    circle_mask_iou,
    depth_rmse,
    depth_scores,
    edge_scores,
    ms_ssim,
    pose_scores,
)


def _square_outline(size=32, top=8, side=16, shift=(0, 0)) -> np.ndarray:
    edges = np.zeros((size, size), np.uint8)
    y, x = top + shift[0], top + shift[1]
    cv2.rectangle(edges, (x, y), (x + side, y + side), 255, 1)
    return edges


def _filled_square(size=64, top=16, side=24, colour=200) -> np.ndarray:
    """An RGB image: a flat square on black (clean, known edges for a canny)."""
    image = np.zeros((size, size, 3), np.uint8)
    image[top : top + side, top : top + side] = colour
    return image


def _drawing(size=64) -> np.ndarray:
    """A line drawing, bright lines on black: two circles and a diagonal."""
    lines = np.zeros((size, size), np.uint8)
    cv2.circle(lines, (20, 24), 10, 255, 2)
    cv2.circle(lines, (44, 40), 14, 255, 2)
    cv2.line(lines, (4, 60), (60, 4), 255, 1)
    return lines


# ---------------------------------------------------------------------------------------------
# zeroconv: edges
# ---------------------------------------------------------------------------------------------


def test_edge_f1_perfect_shifted_and_empty():
    ref = _square_outline()
    assert edge_scores(ref, ref, tolerance=0) == {"edge_precision": 1.0, "edge_recall": 1.0, "edge_f1": 1.0}
    one_px = _square_outline(shift=(0, 1))
    assert edge_scores(one_px, ref, tolerance=1)["edge_f1"] == 1.0  # within tolerance
    assert edge_scores(one_px, ref, tolerance=0)["edge_f1"] < 0.6  # only the horizontal sides still overlap
    diagonal = _square_outline(shift=(1, 1))  # sqrt(2) px away: outside a Euclidean tolerance of 1
    assert edge_scores(diagonal, ref, tolerance=1)["edge_f1"] < 1.0
    assert edge_scores(diagonal, ref, tolerance=2)["edge_f1"] == 1.0
    disjoint = _square_outline(size=64, top=40, side=16)
    assert edge_scores(disjoint, _square_outline(size=64), tolerance=2)["edge_f1"] == 0.0

    empty = np.zeros_like(ref)
    assert edge_scores(empty, ref)["edge_f1"] == 0.0
    assert edge_scores(ref, empty)["edge_f1"] == 0.0
    assert edge_scores(empty, empty)["edge_f1"] == 1.0  # nothing to draw, nothing drawn


def test_edge_precision_and_recall_are_asymmetric():
    ref = _square_outline()
    extra = ref.copy()
    extra[28, :] = 255  # a line the condition does not have
    s = edge_scores(extra, ref, tolerance=1)
    assert s["edge_recall"] == 1.0 and 0.5 < s["edge_precision"] < 1.0
    missing = _square_outline()
    missing[:, :16] = 0  # half of the square not drawn
    s = edge_scores(missing, ref, tolerance=1)
    assert s["edge_precision"] == 1.0 and 0.3 < s["edge_recall"] < 0.8
    # Soft maps (HED) are binarised at the threshold; colour maps use their brightest channel.
    soft = (ref // 255 * 140).astype(np.uint8)
    assert edge_scores(soft, ref, threshold=128)["edge_f1"] == 1.0
    assert edge_scores(soft, ref, threshold=200)["edge_f1"] == 0.0
    assert edge_scores(np.stack([ref, 0 * ref, 0 * ref], -1), ref)["edge_f1"] == 1.0


def test_line_maps_are_scored_in_either_polarity():
    """Dark lines on white (ControlNet 1.1's raw lineart) used to be read as solid edges: any drawing
    and a blank white page both scored F1 1.0 against each other."""
    drawing = _drawing()
    dark_on_white, white_page = 255 - drawing, np.full_like(drawing, 255)
    assert edge_scores(dark_on_white, white_page)["edge_f1"] == 0.0
    assert edge_scores(white_page, dark_on_white)["edge_f1"] == 0.0
    assert edge_scores(dark_on_white, dark_on_white)["edge_f1"] == 1.0
    assert edge_scores(dark_on_white, drawing)["edge_f1"] == 1.0  # the same drawing in the other polarity
    assert edge_scores(white_page, np.zeros_like(drawing))["edge_f1"] == 1.0  # two blank pages
    lineart = Scoring("lineart")
    image = np.zeros((64, 64, 3), np.uint8)
    assert lineart(image, dark_on_white, white_page)["edge_f1"] == 0.0
    assert lineart(image, dark_on_white, drawing)["ssim"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# zeroconv: generic scores (torchmetrics), depth, pose
# ---------------------------------------------------------------------------------------------


def test_ssim_and_correlation_match_independent_implementations():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.uniform(0, 255, (48, 48)), (0, 0), 2).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    expected = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert fidelity_metrics.ssim(a, b) == pytest.approx(expected, abs=1e-3)  # the two differ at the borders only
    assert fidelity_metrics.correlation(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-9)

    assert fidelity_metrics.ssim(a, a) == pytest.approx(1.0) and fidelity_metrics.correlation(a, a) == pytest.approx(
        1.0
    )
    assert fidelity_metrics.correlation(a, 255 - a) == pytest.approx(-1.0)
    lines = _square_outline()
    assert fidelity_metrics.ssim(lines, 255 - lines) < 0
    blank = np.zeros_like(a)
    assert (
        fidelity_metrics.ssim(blank, blank) == pytest.approx(1.0) and fidelity_metrics.correlation(blank, blank) == 1.0
    )
    assert fidelity_metrics.correlation(blank, a) == 0.0  # undefined for a constant map: not equal, so 0
    quarter = np.zeros_like(a)
    quarter[:24, :24] = 255
    disjoint = np.zeros_like(a)
    disjoint[24:, 24:] = 255
    assert fidelity_metrics.correlation(quarter, disjoint) == pytest.approx(-1 / 3)  # (0 - 1/16) / (3/16)


def test_depth_is_scale_and_shift_invariant():
    yy, xx = np.mgrid[0:32, 0:32]
    depth = (20 + 2 * xx + 3 * yy).astype(np.float64)  # a tilted plane, all positive
    same = depth_scores(depth, depth)
    assert same["depth_corr"] == pytest.approx(1.0) and same["depth_si_log"] == pytest.approx(0.0, abs=1e-12)
    scaled = depth_scores(0.5 * depth, depth)  # relative depth: a scale factor is no error
    assert scaled["depth_corr"] == pytest.approx(1.0) and scaled["depth_si_log"] == pytest.approx(0.0, abs=1e-12)
    shifted = depth_scores(depth + 40, depth)  # MiDaS maps are min-max normalised: shift-invariant correlation
    assert shifted["depth_corr"] == pytest.approx(1.0) and shifted["depth_si_log"] > 0.01
    inverted = depth_scores(depth.max() + depth.min() - depth, depth)  # near and far swapped
    assert inverted["depth_corr"] == pytest.approx(-1.0)
    noise = np.random.default_rng(0).uniform(1, 255, depth.shape)
    assert abs(depth_scores(noise, depth)["depth_corr"]) < 0.2
    # uint8 maps with zeros: the log error uses the pixels where both are positive.
    as_uint8 = np.clip(depth, 0, 255).astype(np.uint8)
    assert depth_scores(as_uint8, as_uint8)["depth_si_log"] == pytest.approx(0.0, abs=1e-12)
    blank = np.zeros_like(as_uint8)
    assert depth_scores(blank, as_uint8)["depth_corr"] == 0.0 and np.isnan(depth_scores(blank, blank)["depth_si_log"])


def _pose_map(points: dict[int, tuple[float, float]], size: int = 128) -> np.ndarray:
    """A body map drawn by controlnet_aux itself, keypoints given as {index: (x, y)} in [0, 1]."""
    from controlnet_aux.open_pose.body import Keypoint
    from controlnet_aux.open_pose.util import draw_bodypose

    keypoints = [Keypoint(*points[i]) if i in points else None for i in range(18)]
    return draw_bodypose(np.zeros((size, size, 3), np.uint8), keypoints)


def test_pose_keypoints_from_rendered_skeleton():
    person = {0: (0.5, 0.2), 1: (0.5, 0.35), 2: (0.35, 0.35), 5: (0.65, 0.35), 8: (0.42, 0.7), 11: (0.58, 0.7)}
    ref = _pose_map(person)
    found = fidelity_metrics.pose_keypoints(ref)
    assert sum(len(k) for k in found) == len(person)  # limbs (0.6 x colour) are not mistaken for joints
    assert np.allclose(found[0][0], (0.5 * 128, 0.2 * 128), atol=1.5)
    assert pose_scores(ref, ref) == {"pose_pck": 1.0, "pose_distance": 0.0}
    nudged = _pose_map({k: (x + 2 / 128, y) for k, (x, y) in person.items()})  # 2 px, within 5% of 128 px
    assert pose_scores(nudged, ref)["pose_pck"] == 1.0
    moved = _pose_map({k: (x + 0.2, y) for k, (x, y) in person.items()})
    assert pose_scores(moved, ref)["pose_pck"] == 0.0
    half = _pose_map({k: v for k, v in person.items() if k in (0, 1, 2)})
    assert pose_scores(half, ref)["pose_pck"] == pytest.approx(0.5)
    blank = np.zeros_like(ref)
    assert pose_scores(blank, blank)["pose_pck"] == 1.0 and pose_scores(ref, blank)["pose_pck"] == 0.0


# ---------------------------------------------------------------------------------------------
# controlnet_pp
# ---------------------------------------------------------------------------------------------


def test_controlnet_pp_canny_f1():
    image = _filled_square()
    condition = fidelity_metrics.kornia_canny(image).astype(np.uint8) * 255
    assert 40 < (condition > 0).sum() < 200  # the square's outline, not nothing and not everything
    assert canny_f1(image, condition) == pytest.approx(100.0)
    assert canny_f1(image, 255 - condition) == pytest.approx(100.0)  # dark-on-white condition: the same edges
    assert canny_f1(_filled_square(top=2, side=10), condition) == 0.0  # disjoint squares
    blank_image, blank_condition = np.zeros_like(image), np.zeros_like(condition)
    assert canny_f1(blank_image, condition) == 0.0
    assert canny_f1(blank_image, blank_condition) == 0.0  # torchmetrics' zero_division, as ControlNet++ scores it
    # Exact pixels, no tolerance: the same square 1 px to the side shares only its horizontal edges.
    assert 20 < canny_f1(_filled_square(top=16)[:, list(range(1, 64)) + [63]], condition) < 80


def test_controlnet_pp_ms_ssim():
    drawing = cv2.resize(_drawing(), (256, 256), interpolation=cv2.INTER_NEAREST)
    assert fidelity_metrics._ms_ssim_betas(256) == fidelity_metrics.MS_SSIM_BETAS  # big enough for all five scales
    assert ms_ssim(drawing, drawing) == pytest.approx(1.0, abs=1e-5)
    blank = np.zeros_like(drawing)
    assert ms_ssim(blank, blank) == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim(drawing, blank) < 0.3
    assert ms_ssim(drawing, 255 - drawing) == 0.0  # anti-correlated: 0 where torchmetrics' default is undefined
    disjoint = np.zeros_like(drawing)
    cv2.rectangle(disjoint, (170, 10), (250, 90), 255, 4)
    assert ms_ssim(drawing, disjoint) < 0.2
    # Against the exact call ControlNet++ makes (eval/eval_edge.py), on maps where both are defined.
    import torch
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    soft = cv2.GaussianBlur(drawing, (0, 0), 3)
    metric = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)
    expected = float(
        metric(torch.tensor(soft / 255.0)[None, None].float(), torch.tensor(drawing / 255.0)[None, None].float())
    )
    assert ms_ssim(soft, drawing) == pytest.approx(expected, abs=1e-5)
    # Small maps: fewer scales (a 64 px map takes three), the weights renormalised.
    assert len(fidelity_metrics._ms_ssim_betas(64)) == 3 and sum(fidelity_metrics._ms_ssim_betas(64)) == pytest.approx(
        1.0
    )
    assert ms_ssim(_drawing(), _drawing()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="too small for MS-SSIM"):
        ms_ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_controlnet_pp_lineart_scores_either_polarity():
    drawing = _drawing()
    scoring = Scoring("lineart", protocol="controlnet_pp")
    image = np.zeros((64, 64, 3), np.uint8)
    assert scoring(image, 255 - drawing, drawing) == {"ms_ssim": pytest.approx(1.0, abs=1e-5)}
    assert scoring(image, np.full_like(drawing, 255), drawing)["ms_ssim"] < 0.3  # a blank page is no drawing


def test_controlnet_pp_depth_rmse():
    ramp = np.tile(np.linspace(0, 255, 64), (64, 1))
    assert depth_rmse(ramp, ramp) == 0.0
    assert depth_rmse(0.5 * ramp, ramp) == 0.0  # the prediction is divided by its max
    assert depth_rmse(ramp, 0.5 * ramp + 40) == 0.0  # the condition is min-max normalised
    halves = np.zeros((64, 64))
    halves[:, 32:] = 255
    assert depth_rmse(255 - halves, halves) == pytest.approx(255.0)  # near and far swapped
    other = np.zeros((64, 64))
    other[:32] = 255  # disjoint halves: wrong on exactly half of the pixels
    assert depth_rmse(other, halves) == pytest.approx(255 / np.sqrt(2))
    assert depth_rmse(np.zeros((64, 64)), halves) == pytest.approx(255 / np.sqrt(2))  # a blank prediction
    assert depth_rmse(np.zeros((64, 64)), np.zeros((64, 64))) == 0.0
    scores = Scoring("midas", protocol="controlnet_pp")(np.zeros((64, 64, 3), np.uint8), other, halves)
    assert scores == {
        "depth_rmse": pytest.approx(180.31, abs=0.01),
        "neg_depth_rmse": pytest.approx(-180.31, abs=0.01),
    }


# ---------------------------------------------------------------------------------------------
# Fill50K: the filled circle's mask IoU
# ---------------------------------------------------------------------------------------------


def test_fill50k_mask_iou():
    samples = fill50k(6, size=64, seed=3)
    for s in samples:
        assert circle_mask_iou(s.image, s.condition) > 0.9  # the image drawn from its own outline
        canny = cv2.Canny(s.image, 100, 200)  # the demo's conditions: canny of the image
        assert circle_mask_iou(s.image, canny) > 0.9
    a, b = samples[0], samples[1]
    moved = np.roll(a.image, 64 // 2, axis=1)  # the same circle half the image away
    assert circle_mask_iou(moved, a.condition) < 0.3
    flat = np.full_like(a.image, a.image[0, 0])  # the background only: no circle drawn
    assert circle_mask_iou(flat, a.condition) == 0.0
    assert circle_mask_iou(flat, np.zeros_like(a.condition)) == 1.0  # nothing asked, nothing drawn
    assert circle_mask_iou(a.image, 255 - a.condition) > 0.9  # a dark outline on white
    assert circle_mask_iou(b.image, a.condition) < circle_mask_iou(a.image, a.condition)


def test_fill50k_mask_of_a_circle_cut_by_the_border():
    yy, xx = np.mgrid[0:64, 0:64]
    dist = np.sqrt((yy - 16) ** 2 + (xx - 10) ** 2)
    image = np.full((64, 64, 3), (40, 60, 220), np.uint8)
    image[dist <= 18] = (240, 220, 40)
    condition = ((np.abs(dist - 18) <= 1) * 255).astype(np.uint8)
    assert circle_mask_iou(image, condition) > 0.9


# ---------------------------------------------------------------------------------------------
# Scoring: protocols, headlines, settings
# ---------------------------------------------------------------------------------------------


def test_scoring_dispatch_headlines_and_refusals():
    ref = _square_outline(size=64)
    image = np.zeros((64, 64, 3), np.uint8)
    assert set(Scoring("content_shuffle")(image, ref, ref)) == {"ssim", "corr"}
    assert set(Scoring("canny")(image, ref, ref)) == {"ssim", "corr", "edge_precision", "edge_recall", "edge_f1"}
    assert set(Scoring("canny", protocol="controlnet_pp")(image, ref, ref)) == {"canny_f1"}
    assert set(Scoring("canny", mask_iou=True)(image, ref, ref)) >= {"edge_f1", "mask_iou"}
    assert [Scoring(n).headline for n in ("canny", "hed", "midas", "openpose", "content_shuffle")] == [
        "edge_f1",
        "edge_f1",
        "depth_corr",
        "pose_pck",
        "ssim",
    ]
    assert [Scoring(n, protocol="controlnet_pp").headline for n in ("canny", "hed", "lineart", "midas")] == [
        "canny_f1",
        "ms_ssim",
        "ms_ssim",
        "neg_depth_rmse",
    ]
    # What decides the value is in the settings (the protocol hash): the protocols never compare equal.
    assert Scoring("canny").settings() != Scoring("canny", protocol="controlnet_pp").settings()
    assert Scoring("canny").settings() != Scoring("canny", edge_tolerance=1).settings()
    assert (
        Scoring("canny", protocol="controlnet_pp").settings()
        == Scoring("canny", protocol="controlnet_pp", edge_tolerance=1).settings()
    )  # tolerances are not part of ControlNet++'s metrics
    with pytest.raises(ValueError, match="controlnet_pp has no metric for annotator 'openpose'"):
        Scoring("openpose", protocol="controlnet_pp")
    with pytest.raises(ValueError, match="unknown protocol 'controlnet'"):
        Scoring("canny", protocol="controlnet")
    with pytest.raises(ValueError, match="differ in size"):
        Scoring("canny")(image, ref, ref[:16])


def test_protocol_is_a_validated_config_field():
    from pipelines.common.config import ConfigError, load_config
    from pipelines.evaluate import EvaluateConfig

    assert load_config(EvaluateConfig, None, ["protocol=controlnet_pp"]).protocol == "controlnet_pp"
    assert load_config(EvaluateConfig, None, []).protocol == "zeroconv"
    with pytest.raises(ConfigError, match="protocol"):
        load_config(EvaluateConfig, None, ["protocol=controlnet"])
