"""How well a generated image obeys its condition: scores between condition maps, under a protocol.

Evaluation re-runs the model's own annotator on each generated image and compares the result with
the condition the image was generated from. A :class:`Scoring` holds everything that decides the
numbers (protocol, annotator, tolerances) and scores one sample from three uint8 arrays, (H, W) or
(H, W, C): the generated ``image``, its re-annotation ``reannotated`` and the input ``condition``.

Two protocols:

* ``zeroconv`` (ours), by annotator family (:func:`family`); every headline is higher-is-better:
  edge  - canny, hed, lineart, mlsd, ...: edge F1 with a pixel tolerance (BSDS-style);
  depth - midas, zoe, ...: Pearson correlation and Eigen et al.'s scale-invariant log error;
  pose  - openpose, dwpose: PCK of keypoints read back from the rendered skeleton's colours;
  every annotator also gets SSIM and Pearson correlation of the maps (the headline of ``generic``).
* ``controlnet_pp``: the evaluation of ControlNet++ (Li et al., ECCV 2024; liming-ai/ControlNet_Plus_Plus
  eval/eval.py, eval_edge.py, eval_depth.py): canny F1 x 100 of kornia's canny (0.1 / 0.2 on [0, 1]
  images), exact pixels; HED-style soft edges and lineart: MS-SSIM of the grayscale maps, data range 1;
  depth: RMSE on the 0-255 scale, the prediction divided by its max, the condition min-max normalised.
  Other annotators have no ControlNet++ metric and are refused.

Both can add ``mask_iou`` for Fill50K-style data (a filled circle; ``fidelity_metrics.circle_mask_iou``).

The metrics themselves (pure functions of uint8 maps, shared by both protocols) live in
:mod:`pipelines.fidelity_metrics`; this module decides which of them a protocol takes for an annotator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipelines import fidelity_metrics as metrics

Protocol = Literal["zeroconv", "controlnet_pp"]
PROTOCOLS = ("zeroconv", "controlnet_pp")

SOFT_EDGE_ANNOTATORS = frozenset({"hed", "softedge", "pidinet", "teed", "anyline"})
LINEART_ANNOTATORS = frozenset({"lineart", "lineart_anime", "lineart_standard"})
EDGE_ANNOTATORS = SOFT_EDGE_ANNOTATORS | LINEART_ANNOTATORS | {"canny", "scribble", "mlsd"}
DEPTH_ANNOTATORS = frozenset({"midas", "zoe", "leres", "leres++", "depth", "depth_anything", "dpt"})
POSE_ANNOTATORS = frozenset({"openpose", "dwpose"})

# zeroconv: the score promotion compares, per family; each is in [0, 1] (depth_corr in [-1, 1]).
HEADLINE = {"edge": "edge_f1", "depth": "depth_corr", "pose": "pose_pck", "generic": "ssim"}
# controlnet_pp: promotion needs higher-is-better, so depth is promoted on the negated RMSE.
CONTROLNET_PP_HEADLINE = {"canny": "canny_f1", "soft_edge": "ms_ssim", "depth": "neg_depth_rmse"}


def family(annotator: str) -> str:
    """'edge', 'depth', 'pose' or 'generic' for a registered annotator name."""
    if annotator in EDGE_ANNOTATORS:
        return "edge"
    if annotator in DEPTH_ANNOTATORS:
        return "depth"
    if annotator in POSE_ANNOTATORS:
        return "pose"
    return "generic"


def controlnet_pp_task(annotator: str) -> str:
    """ControlNet++'s task for an annotator: 'canny', 'soft_edge' (HED, lineart) or 'depth'."""
    if annotator == "canny":
        return "canny"
    if annotator in SOFT_EDGE_ANNOTATORS | LINEART_ANNOTATORS:
        return "soft_edge"
    if annotator in DEPTH_ANNOTATORS:
        return "depth"
    raise ValueError(
        f"protocol controlnet_pp has no metric for annotator {annotator!r} (ControlNet++ scores canny, "
        "HED-style soft edges, lineart and depth); use protocol=zeroconv"
    )


@dataclass(frozen=True)
class Scoring:
    """How one annotator's samples are scored. Scores are comparable only under equal ``settings()``."""

    annotator: str
    protocol: Protocol = "zeroconv"
    edge_tolerance: int = 2
    edge_threshold: int = 128
    pose_tolerance: float = 0.05
    mask_iou: bool = False

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.protocol == "controlnet_pp":
            controlnet_pp_task(self.annotator)  # refuse an annotator ControlNet++ has no metric for, up front

    @property
    def family(self) -> str:
        return family(self.annotator)

    @property
    def headline(self) -> str:
        """The score promotion compares (higher is better)."""
        if self.protocol == "controlnet_pp":
            return CONTROLNET_PP_HEADLINE[controlnet_pp_task(self.annotator)]
        return HEADLINE[self.family]

    def settings(self) -> dict:
        """Everything here that decides a score's value (part of evaluate's protocol hash)."""
        settings: dict = {"metrics": self.protocol, "family": self.family}
        if self.protocol == "zeroconv" and self.family == "edge":
            settings.update(edge_tolerance=self.edge_tolerance, edge_threshold=self.edge_threshold)
        if self.protocol == "zeroconv" and self.family == "pose":
            settings["pose_tolerance"] = self.pose_tolerance
        if self.mask_iou:
            settings["mask_iou"] = True
        return settings

    def __call__(self, image: np.ndarray, reannotated: np.ndarray, condition: np.ndarray) -> dict[str, float]:
        if reannotated.shape[:2] != condition.shape[:2] or image.shape[:2] != condition.shape[:2]:
            raise ValueError(
                f"image, re-annotation and condition differ in size: {image.shape}, {reannotated.shape}, "
                f"{condition.shape}"
            )
        if self.protocol == "zeroconv":
            scores = self._zeroconv(reannotated, condition)
        else:
            scores = self._controlnet_pp(image, reannotated, condition)
        if self.mask_iou:
            scores["mask_iou"] = metrics.circle_mask_iou(image, condition)
        return scores

    def _zeroconv(self, generated: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        kind = self.family
        if kind == "edge":
            generated, reference = metrics.line_map(generated), metrics.line_map(reference)
        scores = {"ssim": metrics.ssim(generated, reference), "corr": metrics.correlation(generated, reference)}
        if kind == "edge":
            scores.update(metrics.edge_scores(generated, reference, self.edge_tolerance, self.edge_threshold))
        elif kind == "depth":
            scores.update(metrics.depth_scores(generated, reference))
        elif kind == "pose":
            scores.update(metrics.pose_scores(generated, reference, self.pose_tolerance))
        return scores

    def _controlnet_pp(self, image: np.ndarray, generated: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        task = controlnet_pp_task(self.annotator)
        if task == "canny":
            return {"canny_f1": metrics.canny_f1(image, reference)}
        if task == "soft_edge":
            return {"ms_ssim": metrics.ms_ssim(metrics.line_map(generated), metrics.line_map(reference))}
        rmse = metrics.depth_rmse(generated, reference)
        return {"depth_rmse": rmse, "neg_depth_rmse": -rmse}
