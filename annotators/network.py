"""Annotators built on controlnet-aux networks, run on whole batches.

controlnet-aux calls each network on one PIL image at a time. Here the network inside each detector
(``HEDdetector.netNetwork``, ``MidasDetector.model``, ...) runs on batches of up to ``batch_size``
images, on the GPU when there is one. The per-image steps around the network are either
controlnet-aux's own code, fed the batched outputs through :class:`Replay`, or a line-for-line
mirror of it; tests/annotators checks the result against controlnet-aux image by image.

Resolution: images arrive at training resolution and maps leave at the same H, W; nothing is
resized. controlnet-aux first resizes to ``detect_resolution`` (short side, rounded to multiples of
64) and at the end to ``image_resolution``; with both equal to the short side of an image whose
sides are multiples of 64, both resizes are the identity, and that is what we match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from annotators import weights as weights_io
from annotators.base import Annotator


def pick_device(device: str | None) -> torch.device:
    """``None`` means the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device (use 'cpu', 'cuda' or 'cuda:N')") from None
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return picked


class NetworkAnnotator(Annotator):
    """Loads its weights once in ``__init__``; :meth:`annotate` runs the batch in chunks.

    Subclasses implement :meth:`load` (build the networks from a local weights directory) and
    :meth:`annotate_batch` (one chunk of at most ``batch_size`` images).
    """

    # How it runs, not what it outputs; the weights are recorded under spec()["weights"] instead.
    runtime_params = ("weights_source", "weights_sha256", "device", "batch_size", "storage")

    def __init__(
        self,
        weights_source: str | None = None,
        weights_sha256: dict[str, str] | None = None,
        device: str | None = None,
        batch_size: int = 16,
        storage: Any = None,
        **params: Any,
    ):
        """
        weights_source: local dir, ``s3://`` prefix or hub repo id; default ``weights.default_source``.
        weights_sha256: {file: sha256} pins checked on load (added to any pins in ``weights``).
        device: torch device; default CUDA when available, else CPU.
        batch_size: images per network forward (GPU memory bound); any batch is split into chunks.
        storage: a pipelines.common.config.StorageConfig for an ``s3://`` source (default: AWS environment).
        """
        super().__init__(
            weights_source=weights_source,
            weights_sha256=weights_sha256,
            device=device,
            batch_size=batch_size,
            storage=storage,
            **params,
        )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.device = pick_device(device)
        self.weights_source = str(weights_source or self.weights.default_source)
        files = self.weight_files()
        directory = weights_io.fetch(files, self.weights_source, storage)
        pins = {**self.weights.sha256, **(weights_sha256 or {})}
        self.weight_hashes = weights_io.verify(directory, files, pins, self.weights_source)
        self.load(directory)

    def weight_files(self) -> tuple[str, ...]:
        """The files this instance loads (a subset of ``weights.files`` where params pick one)."""
        return self.weights.files

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def annotate_batch(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @torch.inference_mode()
    def annotate(self, images: np.ndarray) -> np.ndarray:
        chunks = [images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        return np.concatenate([self.annotate_batch(chunk) for chunk in chunks])

    def to_device(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC numpy -> contiguous float32 NCHW on the device (values 0..255, unscaled)."""
        # Ray Data hands out read-only arrays; torch wants writable memory to share.
        tensor = torch.from_numpy(images if images.flags.writeable else images.copy())
        # Contiguous NCHW, not a channels-last view: the memory format picks the kernels, and with
        # it the float rounding; controlnet-aux's single-image tensors run the NCHW kernels.
        return tensor.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        spec["weights"] = {
            "source": self.weights_source,
            "sha256": self.weight_hashes,
            "licence": self.weights.licence,
        }
        return spec


class Replay:
    """Stands in for a network inside controlnet-aux's per-image code, answering with outputs the
    batched forward already computed for that image.

    OpenPose's body parsing and MLSD's line decoding call the network in the middle of their
    per-image code; replaying lets that code run unchanged. The input it is handed must equal the
    one the batch was built from, so a drift between our preprocessing and controlnet-aux's fails
    loudly instead of silently changing the maps.
    """

    def __init__(self, expected_input: torch.Tensor, outputs: Any):
        self.expected_input = expected_input.cpu()
        self.outputs = outputs

    def parameters(self):
        # controlnet-aux reads its device from the network's first parameter: keep its tensors on CPU.
        yield self.expected_input

    def __call__(self, x: torch.Tensor) -> Any:
        if x.shape != self.expected_input.shape or not torch.equal(x, self.expected_input):
            raise RuntimeError(
                "controlnet-aux prepared a different network input than the batched path; this annotator "
                "mirrors the preprocessing of controlnet-aux 0.0.10 and needs updating for the installed one"
            )
        return self.outputs
