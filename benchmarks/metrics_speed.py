"""Metric speed on synthetic anomaly maps of MVTec AD's size, on this machine.

    python benchmarks/metrics_speed.py                 # CPU
    python benchmarks/metrics_speed.py --device cuda   # maps on the GPU

1. AUPRO of one 160-image 256x256 class: the direct definition (the reference's loop, kept in
   tests/reference_metrics.py) against utils.metrics.aupro, with both times and the difference.
2. All seven metrics for an MVTec-sized test set (15 classes, 1,725 images), class by class.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reference_metrics import direct_aupro  # noqa: E402
from utils.metrics import aupro, class_metrics  # noqa: E402

MVTEC_TEST_IMAGES = {"carpet": 117, "grid": 78, "leather": 124, "tile": 117, "wood": 79, "bottle": 83,
                     "cable": 150, "capsule": 132, "hazelnut": 110, "metal_nut": 115, "pill": 167, "screw": 160,
                     "toothbrush": 42, "transistor": 100, "zipper": 151}


def synthetic_class(n: int, rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Smooth noise maps; two thirds of the images carry 1-3 elliptic defects that raise the map."""
    maps = scipy.ndimage.gaussian_filter(rng.random((n, size, size), dtype=np.float32), sigma=(0, 4, 4))
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 3, n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(20, size - 20, size=2)
            ry, rx = rng.integers(3, 25, size=2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps += masks * rng.uniform(0.0, 0.1, size=(n, 1, 1)).astype(np.float32)
    return maps, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip_direct", action="store_true", help="skip the slow direct AUPRO")
    args = parser.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    maps, masks = synthetic_class(160, rng)
    tmaps, tmasks = torch.from_numpy(maps).to(device), torch.from_numpy(masks).to(device)
    aupro(tmaps, tmasks)  # warm-up
    sync()
    start = time.perf_counter()
    fast = aupro(tmaps, tmasks)
    sync()
    fast_s = time.perf_counter() - start
    print(f"AUPRO, one class of 160 images 256x256 on {device}:")
    print(f"  fast   {fast:.10f}  {fast_s:8.3f} s")
    if not args.skip_direct:
        start = time.perf_counter()
        direct = direct_aupro(maps, masks)
        direct_s = time.perf_counter() - start
        print(f"  direct {direct:.10f}  {direct_s:8.3f} s")
        print(f"  |difference| {abs(fast - direct):.2e}   speed-up {direct_s / fast_s:.0f}x")

    total, images = 0.0, 0
    for name, n in MVTEC_TEST_IMAGES.items():
        maps, masks = synthetic_class(n, rng)
        scores = maps.reshape(n, -1).max(1)
        labels = masks.reshape(n, -1).any(1)
        tensors = [torch.from_numpy(a).to(device) for a in (scores, labels, maps, masks)]
        sync()
        start = time.perf_counter()
        class_metrics(*tensors)
        sync()
        total += time.perf_counter() - start
        images += n
    print(f"All seven metrics, MVTec-sized test set ({len(MVTEC_TEST_IMAGES)} classes, {images} images, "
          f"256x256) on {device}: {total:.2f} s of metric time")


if __name__ == "__main__":
    main()
