"""The metrics of control fidelity: pure functions comparing uint8 maps, (H, W) or (H, W, C).

Which of them a protocol takes for an annotator, and which is its headline, is decided in
:mod:`pipelines.fidelity`; both protocols share the map conversions here.

Line maps come in two polarities: controlnet-aux and our annotators draw bright lines on black, while
ControlNet 1.1's raw lineart (and many datasets) are dark lines on white. Every edge map is brought to
bright-on-black first (:func:`line_map`), so a dark-on-white drawing is not scored as solid edges.
"""

from __future__ import annotations

import cv2
import numpy as np

# ControlNet++ (eval/eval.py): kornia.filters.canny(image / 255, 0.1, 0.2) for conditions and outputs.
KORNIA_CANNY_THRESHOLDS = (0.1, 0.2)
# Wang et al. 2003's five scale weights (torchmetrics' default), used whenever the image is large enough.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# A generated pixel belongs to the Fill50K circle if its colour is this far (RGB distance) from the
# background at least; the palette's closest pair of colours (orange/yellow) is 83 apart.
MIN_MASK_CONTRAST = 32.0

# OpenPose body keypoint colours as controlnet_aux draws them (open_pose/util.py: draw_bodypose):
# keypoint k is a filled circle of colour k; limbs use 0.6 x these colours, so they never match.
# fmt: off
OPENPOSE_COLOURS = np.array([
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
    [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
    [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
], dtype=np.int16)
# fmt: on


# ---------------------------------------------------------------------------------------------
# Map conversions
# ---------------------------------------------------------------------------------------------


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> float64 (H, W); colour maps are averaged over channels."""
    arr = np.asarray(image, dtype=np.float64)
    return arr.mean(axis=-1) if arr.ndim == 3 else arr


def line_map(image: np.ndarray) -> np.ndarray:
    """An edge/line map as uint8 (H, W), bright lines on black, whichever polarity it came in.

    Colour maps use their brightest channel. Lines cover a minority of any line map, so its median is
    the background: a map whose median is bright (dark lines on white) is inverted.
    """
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    arr = arr.astype(np.uint8)
    return 255 - arr if np.median(arr) > 127 else arr


def _tensor(gray: np.ndarray):
    """float (H, W) -> float32 tensor (1, 1, H, W)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None, None]


# ---------------------------------------------------------------------------------------------
# Generic (torchmetrics)
# ---------------------------------------------------------------------------------------------


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of two maps."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    value = structural_similarity_index_measure(
        _tensor(_gray(a)), _tensor(_gray(b)), gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=data_range
    )
    return float(value)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps; two constant maps (undefined) score 1 if equal, else 0."""
    import torch
    from torchmetrics.functional import pearson_corrcoef

    x, y = _gray(a), _gray(b)
    if x.std() == 0 or y.std() == 0:
        return float(np.array_equal(x, y))
    # float64: float32 sums over a 512 x 512 map lose digits that a correlation near 1 needs.
    return float(pearson_corrcoef(torch.from_numpy(x.ravel()), torch.from_numpy(y.ravel())))


# ---------------------------------------------------------------------------------------------
# Edges (zeroconv)
# ---------------------------------------------------------------------------------------------


def _disk(radius: int) -> np.ndarray:
    """Structuring element of the pixels within Euclidean distance ``radius`` of the centre."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx <= radius * radius).astype(np.uint8)


def edge_scores(
    generated: np.ndarray, reference: np.ndarray, tolerance: int = 2, threshold: int = 128
) -> dict[str, float]:
    """Precision, recall and F1 of edge pixels, matching within ``tolerance`` pixels.

    A generated edge pixel is correct if a reference edge lies within ``tolerance`` (Euclidean) of it;
    a reference edge pixel is found if a generated edge lies within ``tolerance`` of it. Tolerance is
    implemented by dilating the other map with a disk. Maps go through :func:`line_map` (polarity,
    brightest channel); soft edge maps (HED, PiDiNet) are then binarised at ``threshold``. Both maps
    empty: 1.0 (nothing to draw, nothing drawn); exactly one empty: 0.0.
    """
    pred, ref = line_map(generated) >= threshold, line_map(reference) >= threshold
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 or n_ref == 0:
        value = 1.0 if n_pred == n_ref else 0.0
        return {"edge_precision": value, "edge_recall": value, "edge_f1": value}
    kernel = _disk(tolerance)
    near_ref = cv2.dilate(ref.astype(np.uint8), kernel).astype(bool)
    near_pred = cv2.dilate(pred.astype(np.uint8), kernel).astype(bool)
    precision = float((pred & near_ref).sum() / n_pred)
    recall = float((ref & near_pred).sum() / n_ref)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"edge_precision": precision, "edge_recall": recall, "edge_f1": f1}


# ---------------------------------------------------------------------------------------------
# ControlNet++ (controlnet_pp)
# ---------------------------------------------------------------------------------------------


def kornia_canny(image: np.ndarray) -> np.ndarray:
    """ControlNet++'s canny: kornia's, thresholds 0.1 / 0.2 on the [0, 1] image -> bool (H, W)."""
    import torch
    from kornia.filters import canny

    arr = np.asarray(image, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr if arr.ndim == 3 else arr[..., None]).permute(2, 0, 1)[None]
    low, high = KORNIA_CANNY_THRESHOLDS
    return canny(x, low, high)[1][0, 0].numpy() > 0.5


def canny_f1(image: np.ndarray, condition: np.ndarray) -> float:
    """F1 x 100 of kornia's canny edges of the generated ``image`` against the condition's edges, pixel
    for pixel (torchmetrics' BinaryF1Score, as ControlNet++; no edges anywhere scores 0 there too)."""
    import torch
    from torchmetrics.functional.classification import binary_f1_score

    pred = torch.from_numpy(kornia_canny(image).ravel()).long()
    target = torch.from_numpy((line_map(condition) >= 128).ravel()).long()
    return 100.0 * float(binary_f1_score(pred, target))


def _ms_ssim_betas(side: int) -> tuple[float, ...]:
    """The five standard scale weights, or, for an image too small for five (torchmetrics needs
    side // (scales - 1)^2 > 10, i.e. 176 px), the first ones that fit, renormalised to sum 1."""
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        if side >= 2**scales and side // max(1, scales - 1) ** 2 > 10:
            if scales == len(MS_SSIM_BETAS):
                return MS_SSIM_BETAS
            kept = MS_SSIM_BETAS[:scales]
            return tuple(b / sum(kept) for b in kept)
    raise ValueError(f"maps of {side} px are too small for MS-SSIM (11 px window)")


def ms_ssim(generated: np.ndarray, reference: np.ndarray) -> float:
    """Multi-scale SSIM of two grayscale maps in [0, 1] (data range 1), torchmetrics' implementation.

    ``normalize="relu"``: equal to the default wherever that is defined; where a negative contrast
    term (anti-correlated maps) would make the default NaN, this scores 0.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    x, y = _gray(generated) / 255.0, _gray(reference) / 255.0
    betas = _ms_ssim_betas(min(x.shape))
    value = multiscale_structural_similarity_index_measure(
        _tensor(x), _tensor(y), data_range=1.0, betas=betas, normalize="relu"
    )
    return float(value)


def depth_rmse(generated: np.ndarray, reference: np.ndarray) -> float:
    """ControlNet++'s depth RMSE (lower is better) on the 0-255 scale: the re-annotated depth divided by
    its max, the condition min-max normalised, both truncated to integers as their PNG files are."""
    pred, ref = _gray(generated), _gray(reference)
    pred = np.floor(pred / pred.max() * 255.0) if pred.max() > 0 else np.zeros_like(pred)
    span = ref.max() - ref.min()
    ref = np.floor((ref - ref.min()) / span * 255.0) if span > 0 else np.zeros_like(ref)
    return float(np.sqrt(np.mean((pred - ref) ** 2)))


# ---------------------------------------------------------------------------------------------
# Fill50K: the filled circle
# ---------------------------------------------------------------------------------------------


def circle_mask_from_condition(condition: np.ndarray) -> np.ndarray:
    """The disc a Fill50K outline encloses, bool (H, W): an ellipse fitted to the outline's pixels
    (a least-squares fit, so a circle cut by the image border still gives the whole disc)."""
    lines = line_map(condition) >= 128
    mask = np.zeros(lines.shape, np.uint8)
    points = np.argwhere(lines)[:, ::-1].astype(np.float32)  # (x, y)
    if len(points) >= 5:  # fitEllipse's minimum
        (cx, cy), (width, height), angle = cv2.fitEllipse(points)
        cv2.ellipse(mask, ((cx, cy), (width, height), angle), 1, thickness=-1)
    return mask.astype(bool)


def circle_mask_from_image(image: np.ndarray) -> np.ndarray:
    """The filled circle of a Fill50K image, bool (H, W): pixels whose colour is far from the background.

    The background colour is the median of the border pixels (the circle covers at most a sixth of the
    border); "far" is Otsu's threshold on the colour distance, at least ``MIN_MASK_CONTRAST``.
    """
    rgb = np.asarray(image, dtype=np.float64)
    rgb = rgb if rgb.ndim == 3 else rgb[..., None]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    distance = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1)
    otsu, _ = cv2.threshold(distance.clip(0, 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return distance > max(otsu, MIN_MASK_CONTRAST)


def circle_mask_iou(image: np.ndarray, condition: np.ndarray) -> float:
    """IoU of the circle in the generated image with the disc its condition outlines; both empty: 1.0."""
    generated, wanted = circle_mask_from_image(image), circle_mask_from_condition(condition)
    union = int((generated | wanted).sum())
    return 1.0 if union == 0 else float((generated & wanted).sum() / union)


# ---------------------------------------------------------------------------------------------
# Depth (zeroconv)
# ---------------------------------------------------------------------------------------------


def depth_scores(generated: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Relative depth agreement: ``depth_corr`` (Pearson; scale- and shift-invariant, higher is better)
    and ``depth_si_log`` (Eigen et al.'s scale-invariant RMSE of log values over pixels where both maps
    are positive; 0 is perfect, lower is better).

    MiDaS-style maps are inverse depth normalised to 0..255, i.e. known only up to scale and shift, so
    no absolute error is meaningful. The log error is the same whether the maps hold depth or
    disparity (log(1/d) = -log d flips the sign of every difference, not their spread).
    """
    x, y = _gray(generated), _gray(reference)
    valid = (x > 0) & (y > 0)
    if valid.sum() >= 2:
        d = np.log(x[valid]) - np.log(y[valid])
        si_log = float(np.sqrt(max(np.mean(d * d) - np.mean(d) ** 2, 0.0)))
    else:
        si_log = float("nan")  # no overlap of valid depth: undefined, left out of means
    return {"depth_corr": correlation(x, y), "depth_si_log": si_log}


# ---------------------------------------------------------------------------------------------
# Pose (zeroconv)
# ---------------------------------------------------------------------------------------------


def pose_keypoints(pose_map: np.ndarray, colour_tolerance: int = 10) -> list[np.ndarray]:
    """Keypoints of a rendered OpenPose body map: for each of the 18 keypoint colours, the centroids
    (x, y) of the blobs of exactly that colour (one per person), as a (K, 2) array.

    This is a proxy for running a pose detector on the map: controlnet_aux draws keypoint k as a
    filled circle of colour k on top of limbs drawn at 0.6 x brightness, so colour identifies the
    joint. Overlapping circles shift a centroid by a pixel or two; hands and faces are ignored.
    """
    arr = np.asarray(pose_map)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"a pose map must be RGB (H, W, 3), got shape {arr.shape}")
    rgb = arr.astype(np.int16)
    keypoints = []
    for colour in OPENPOSE_COLOURS:
        mask = (np.abs(rgb - colour).max(axis=-1) <= colour_tolerance).astype(np.uint8)
        count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        # Skip the background label 0 and specks of a pixel or two (anti-aliasing, generated noise).
        keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= 3]
        keypoints.append(centroids[keep].reshape(-1, 2))
    return keypoints


def pose_scores(generated: np.ndarray, reference: np.ndarray, tolerance: float = 0.05) -> dict[str, float]:
    """``pose_pck``: fraction of the reference's keypoints that the generated map has, same joint,
    within ``tolerance`` x the image's longer side (PCK); ``pose_distance``: mean distance of the
    found ones in the same unit (lower is better). No keypoints in either map: both perfect."""
    size = float(max(np.asarray(reference).shape[:2]))
    ref_keypoints, gen_keypoints = pose_keypoints(reference), pose_keypoints(generated)
    total = sum(len(p) for p in ref_keypoints)
    if total == 0:
        extra = sum(len(p) for p in gen_keypoints)
        return {"pose_pck": 1.0 if extra == 0 else 0.0, "pose_distance": 0.0 if extra == 0 else float("nan")}
    found, distances = 0, []
    for ref_points, gen_points in zip(ref_keypoints, gen_keypoints):
        if len(ref_points) == 0 or len(gen_points) == 0:
            continue
        nearest = np.sqrt(((ref_points[:, None, :] - gen_points[None, :, :]) ** 2).sum(-1)).min(axis=1) / size
        hits = nearest <= tolerance
        found += int(hits.sum())
        distances.extend(nearest[hits].tolist())
    return {"pose_pck": found / total, "pose_distance": float(np.mean(distances)) if distances else float("nan")}
