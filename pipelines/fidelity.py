"""How well a generated image obeys its condition: scores between two condition maps.

Evaluation re-runs the model's own annotator on each generated image and compares the result with
the condition the image was generated from. Every function here takes two maps of the same size,
``generated`` (the re-annotated output) and ``reference`` (the input condition), as uint8 or float
arrays (H, W) or (H, W, C), and returns plain floats. All headline scores are "higher is better".

Families, chosen by annotator name (:func:`family`):

* edge  - canny, hed, pidinet, lineart, mlsd, ...: edge F1 with a pixel tolerance (BSDS-style).
* depth - midas, zoe, leres, ...: Pearson correlation (invariant to the scale and shift a relative
          depth map is only defined up to) and the scale-invariant log error of Eigen et al. 2014.
* pose  - openpose, dwpose: PCK of keypoints recovered from the rendered skeleton's colours (a proxy,
          see :func:`pose_keypoints`).
* every annotator also gets SSIM and normalised correlation of the two maps (the ``generic`` family
  uses SSIM as its headline), so models with any annotator can be compared.
"""

from __future__ import annotations

import cv2
import numpy as np

EDGE_ANNOTATORS = frozenset(
    {
        "canny",
        "hed",
        "softedge",
        "pidinet",
        "teed",
        "anyline",
        "scribble",
        "lineart",
        "lineart_anime",
        "lineart_standard",
        "mlsd",
    }
)
DEPTH_ANNOTATORS = frozenset({"midas", "zoe", "leres", "leres++", "depth", "depth_anything", "dpt"})
POSE_ANNOTATORS = frozenset({"openpose", "dwpose"})

# The score promotion compares, per family; each is in [0, 1] (depth_corr in [-1, 1]), higher is better.
HEADLINE = {"edge": "edge_f1", "depth": "depth_corr", "pose": "pose_pck", "generic": "ssim"}

# OpenPose body keypoint colours as controlnet_aux draws them (open_pose/util.py: draw_bodypose):
# keypoint k is a filled circle of colour k; limbs use 0.6 x these colours, so they never match.
OPENPOSE_COLOURS = np.array(
    [
        [255, 0, 0],
        [255, 85, 0],
        [255, 170, 0],
        [255, 255, 0],
        [170, 255, 0],
        [85, 255, 0],
        [0, 255, 0],
        [0, 255, 85],
        [0, 255, 170],
        [0, 255, 255],
        [0, 170, 255],
        [0, 85, 255],
        [0, 0, 255],
        [85, 0, 255],
        [170, 0, 255],
        [255, 0, 255],
        [255, 0, 170],
        [255, 0, 85],
    ],
    dtype=np.int16,
)


def family(annotator: str) -> str:
    """'edge', 'depth', 'pose' or 'generic' for a registered annotator name."""
    if annotator in EDGE_ANNOTATORS:
        return "edge"
    if annotator in DEPTH_ANNOTATORS:
        return "depth"
    if annotator in POSE_ANNOTATORS:
        return "pose"
    return "generic"


def score(
    kind: str,
    generated: np.ndarray,
    reference: np.ndarray,
    edge_tolerance: int = 2,
    edge_threshold: int = 128,
    pose_tolerance: float = 0.05,
) -> dict[str, float]:
    """Every score for one pair of maps: the family's own plus the generic ones."""
    if generated.shape[:2] != reference.shape[:2]:
        raise ValueError(f"condition maps differ in size: {generated.shape} vs {reference.shape}")
    scores = {"ssim": ssim(generated, reference), "corr": correlation(generated, reference)}
    if kind == "edge":
        scores.update(edge_scores(generated, reference, edge_tolerance, edge_threshold))
    elif kind == "depth":
        scores.update(depth_scores(generated, reference))
    elif kind == "pose":
        scores.update(pose_scores(generated, reference, pose_tolerance))
    elif kind != "generic":
        raise ValueError(f"unknown score family {kind!r}; choose one of {', '.join(HEADLINE)}")
    return scores


# ---------------------------------------------------------------------------------------------
# Generic
# ---------------------------------------------------------------------------------------------


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> float64 (H, W); colour maps are averaged over channels."""
    arr = np.asarray(image, dtype=np.float64)
    return arr.mean(axis=-1) if arr.ndim == 3 else arr


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of two maps."""
    x, y = _gray(a), _gray(b)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps; two constant maps score 1 if equal, else 0."""
    x, y = _gray(a).ravel(), _gray(b).ravel()
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    if norm == 0:
        return float(np.array_equal(_gray(a), _gray(b)))
    return float((x * y).sum() / norm)


# ---------------------------------------------------------------------------------------------
# Edges
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
    implemented by dilating the other map with a disk. Soft edge maps (HED, PiDiNet) are binarised at
    ``threshold``; colour maps use their brightest channel. Both maps empty: 1.0 (nothing to draw,
    nothing drawn); exactly one empty: 0.0.
    """
    pred, ref = _edges(generated, threshold), _edges(reference, threshold)
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


def _edges(image: np.ndarray, threshold: int) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    return arr >= threshold


# ---------------------------------------------------------------------------------------------
# Depth
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
# Pose
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
