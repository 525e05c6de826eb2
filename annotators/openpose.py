"""OpenPose body keypoints drawn as a skeleton (controlnet-aux's OpenposeDetector, body only).

The body network runs batched; parsing its heatmaps into people (peaks, limb matching) is
controlnet-aux's own per-image code, fed the batched outputs through Replay. That parsing is
CPU work and dominates at large batch sizes. Hands and faces are not supported.

The weights are licensed by CMU for non-commercial use only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from annotators.base import WeightsSpec, register
from annotators.network import NetworkAnnotator, Replay

# Body.__call__'s single scale: the network sees the image scaled to 0.5 * 368 px high,
# padded right/down to a multiple of 8 with grey 128.
_SCALE, _BOXSIZE, _STRIDE, _PAD_VALUE = 0.5, 368, 8, 128


def _body_input(bgr: np.ndarray) -> np.ndarray:
    """The network input Body.__call__ builds from a BGR image: (3, h, w) float32 in [-0.5, 0.5)."""
    from controlnet_aux.open_pose import util

    scale = _SCALE * _BOXSIZE / bgr.shape[0]
    resized = util.smart_resize_k(bgr, fx=scale, fy=scale)
    padded, _ = util.padRightDownCorner(resized, _STRIDE, _PAD_VALUE)
    return np.transpose(np.float32(padded), (2, 0, 1)) / 256 - 0.5


@register
class OpenPose(NetworkAnnotator):
    name = "openpose"
    version = "1"
    channels = 3
    commercial_use = False
    weights = WeightsSpec(files=("body_pose_model.pth",), licence="CMU OpenPose licence: non-commercial use only")

    def load(self, directory: Path) -> None:
        from controlnet_aux.open_pose.body import Body

        self.body = Body(str(directory / self.weights.files[0])).to(self.device)

    def annotate_batch(self, images: np.ndarray) -> np.ndarray:
        from controlnet_aux.open_pose import OpenposeDetector, draw_poses
        from controlnet_aux.open_pose.body import Body

        class ReplayBody(Body):
            def __init__(self, model: Replay):  # no weights to load: the outputs are already computed
                self.model = model

        _, h, w, _ = images.shape
        # detect_poses hands Body the image as BGR.
        inputs = torch.from_numpy(np.stack([_body_input(image[:, :, ::-1]) for image in images]))
        pafs, heatmaps = (out.cpu() for out in self.body.model(inputs.to(self.device)))
        maps = []
        for i, image in enumerate(images):
            replay = Replay(inputs[i : i + 1], (pafs[i : i + 1], heatmaps[i : i + 1]))
            poses = OpenposeDetector(ReplayBody(replay)).detect_poses(image)
            maps.append(draw_poses(poses, h, w, draw_body=True, draw_hand=False, draw_face=False))
        return np.stack(maps)
