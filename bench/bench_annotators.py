"""Benchmark: our batched network annotators vs controlnet-aux called one image at a time.

    python bench/bench_annotators.py --size 512 --n 32 --batch-size 16 [--weights DIR]

For each annotator, same weights, same images: (a) baseline: controlnet-aux's detector per image
(``detect_resolution = image_resolution = size``), (b) ``annotators.create(name)(images)`` batched.
Runs on the GPU when there is one (both sides), else on the CPU. Without ``--weights`` it writes
random weights in the real file formats (speed does not depend on the values). Prints one JSON
object per annotator: images/s for both, the speedup, and the largest uint8 difference between
them. Target: on a GPU, (b) >= 3x (a) at 512 px for hed, midas, lineart, normalbae; on a CPU batching
buys little (both are compute bound) and (b) should be >= 1x.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotators import create  # noqa: E402


def _random_state_dicts() -> dict[str, Callable[[], dict]]:
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    from controlnet_aux.normalbae.nets.NNET import NNET

    nnet_args = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    return {
        "ControlNetHED.pth": lambda: ControlNetHED_Apache2().state_dict(),
        "sk_model.pth": lambda: Generator(3, 1, 3).state_dict(),
        "dpt_hybrid-midas-501f0c75.pt": lambda: DPTDepthModel(
            path=None, backbone="vitb_rn50_384", non_negative=True
        ).state_dict(),
        "scannet.pt": lambda: {"model": NNET(nnet_args).state_dict()},
    }


def _detector(name: str, directory: Path):
    import controlnet_aux as aux
    from controlnet_aux.lineart import LineartDetector

    if name == "lineart":  # from_pretrained insists on the coarse file too; build it as it would
        from controlnet_aux.lineart import Generator

        net = Generator(3, 1, 3)
        net.load_state_dict(torch.load(directory / "sk_model.pth", map_location="cpu"))
        return LineartDetector(net.eval(), net)
    return {"hed": aux.HEDdetector, "midas": aux.MidasDetector, "normalbae": aux.NormalBaeDetector}[
        name
    ].from_pretrained(str(directory))


def _images(n: int, size: int) -> np.ndarray:
    import cv2
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return np.stack([cv2.resize(photos[i % 4], (size, size), interpolation=cv2.INTER_AREA) for i in range(n)])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in px (multiple of 64)")
    parser.add_argument("--n", type=int, default=32, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="images per network forward in (b)")
    parser.add_argument("--annotators", default="hed,lineart,midas,normalbae")
    parser.add_argument("--weights", default=None, help="directory with real weights (default: random)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.annotators.split(",")
    files = {
        "hed": "ControlNetHED.pth",
        "lineart": "sk_model.pth",
        "midas": "dpt_hybrid-midas-501f0c75.pt",
        "normalbae": "scannet.pt",
    }
    images = _images(args.n, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.weights or tmp)
        if not args.weights:
            builders = _random_state_dicts()
            for name in names:
                torch.save(builders[files[name]](), directory / files[name])
        for name in names:
            ours = create(name, weights_source=str(directory), device=device, batch_size=args.batch_size)
            detector = _detector(name, directory).to(device)
            ours(images[:2])  # warm-up (kernel selection, allocator) for both sides
            detector(images[0], detect_resolution=args.size, image_resolution=args.size, output_type="np")

            _sync(device)
            start = time.perf_counter()
            baseline = np.stack(
                [
                    detector(image, detect_resolution=args.size, image_resolution=args.size, output_type="np")
                    for image in images
                ]
            )
            _sync(device)
            baseline_s = time.perf_counter() - start

            start = time.perf_counter()
            batched = ours(images)
            _sync(device)
            ours_s = time.perf_counter() - start

            baseline = baseline[..., : ours.channels]
            print(
                json.dumps(
                    {
                        "annotator": name,
                        "device": device,
                        "size": args.size,
                        "n": args.n,
                        "batch_size": args.batch_size,
                        "controlnet_aux_img_per_s": round(args.n / baseline_s, 2),
                        "ours_img_per_s": round(args.n / ours_s, 2),
                        "speedup": round(baseline_s / ours_s, 2),
                        "max_abs_diff": int(np.abs(batched.astype(int) - baseline.astype(int)).max()),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
