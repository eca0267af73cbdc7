"""MVTec 3D-AD, as prepare_data/prepare_mvtec3d.py writes it, for Dinomaly2's RGB-D setting.

    <root>/<class>/train/good/{rgb/<name>.png, z/<name>.tiff}
    <root>/<class>/test/good/{rgb/<name>.png, z/<name>.tiff}
    <root>/<class>/test/<defect>/{rgb/<name>.png, z/<name>.tiff, gt/<name>.png}

A sample is its RGB image and a rendering of its depth (the released loader, negin-kafee/Dinomaly2 @1745c61
dataset.py:219-234): foreground = z > 0; z min-max normalised over the foreground; 1 - 0.8 z (near 1.0, far
0.2); background 0; OpenCV's HOT colour map; the RGB image blacked out where z is 0. With `modality: rgbd`
the model gets both (6 channels); with `modality: rgb` only the blacked-out RGB image. Depth maps and masks are
paired to images by name, never by position (the released loader sorts rgb/ and gt/ separately and zips them).
"""
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .folder import DatasetLayoutError, ImageReadError, TestSample, _pair_masks, load_image

CLASSES = ["cable_gland", "bagel", "peach", "carrot", "dowel", "foam", "cookie", "rope", "potato", "tire"]
NORMAL = "good"
PREPARE = "prepare it with: python prepare_data/prepare_mvtec3d.py --data_path ../mvtec_3d --out ../mvtec_3d_dinomaly"


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"missing {what}: {path} (the prepared MVTec 3D-AD tree; {PREPARE})")
    return path


def depth_path(rgb_path: Path) -> Path:
    """<defect>/z/<name>.tiff beside <defect>/rgb/<name>.png."""
    return rgb_path.parent.parent / "z" / f"{rgb_path.stem}.tiff"


def _rgb_images(defect_dir: Path) -> list[Path]:
    rgb_dir = _require_dir(defect_dir / "rgb", f"rgb folder of {defect_dir.name}")
    images = sorted(rgb_dir.glob("*.png"))
    for image in images:
        if not depth_path(image).is_file():
            raise DatasetLayoutError(f"image {image} has no depth map: expected {depth_path(image)} ({PREPARE})")
    return images


def train_images(root: Path, class_name: str) -> list[Path]:
    images = _rgb_images(Path(root) / class_name / "train" / NORMAL)
    if not images:
        raise DatasetLayoutError(f"no training images in {Path(root) / class_name / 'train' / NORMAL / 'rgb'}")
    return images


def list_test_samples(root: Path, class_name: str) -> list[TestSample]:
    test_dir = _require_dir(Path(root) / class_name / "test", f"test folder of class '{class_name}'")
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        images = _rgb_images(defect_dir)
        if defect_dir.name == NORMAL:
            samples += [TestSample(p, None, 0, NORMAL, class_name) for p in images]
        elif images:
            masks = _pair_masks(images, _require_dir(defect_dir / "gt", f"masks of defect '{defect_dir.name}'"))
            samples += [TestSample(p, m, 1, defect_dir.name, class_name) for p, m in zip(images, masks)]
    if not any(s.label == 0 for s in samples) or not any(s.label == 1 for s in samples):
        raise DatasetLayoutError(f"{test_dir} needs both normal (test/{NORMAL}) and defect images for evaluation")
    return samples


def load_depth(path: Path) -> np.ndarray:
    """The prepared z channel, H x W float32 (a mode-F tiff)."""
    try:
        with Image.open(path) as image:
            z = np.array(image, dtype=np.float32)
    except Exception as error:
        raise ImageReadError(f"cannot decode depth map {path}: {error}") from None
    if z.ndim != 2:
        raise ImageReadError(f"depth map {path} has shape {z.shape}: expected one channel ({PREPARE})")
    return z


def render_depth(z: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 RGB rendering, foreground mask), the released arithmetic in its float32 order.
    A map without foreground, or with one depth only, is an error naming it (the released loader takes the
    minimum of an empty array, or divides by zero)."""
    foreground = z > 0
    if not foreground.any():
        raise ImageReadError(f"depth map {path} has no point with z > 0")
    low, high = z[foreground].min(), z.max()
    if high == low:
        raise ImageReadError(f"depth map {path} has a single depth value {high}: nothing to normalise")
    depth = 1 - (z - low) / (high - low) * 0.8
    depth[~foreground] = 0
    rendering = cv2.applyColorMap((depth * 255).astype(np.uint8), cv2.COLORMAP_HOT)[:, :, ::-1]
    return np.ascontiguousarray(rendering), foreground


class RGBDReader:
    """A sample's images: [RGB blacked out off the object, depth rendering] (rgbd) or the first alone (rgb)."""

    def __init__(self, modality: str):
        self.modality = modality

    def __call__(self, rgb_path: Path) -> list[Image.Image]:
        rgb = np.array(load_image(rgb_path))
        z_path = depth_path(rgb_path)
        z = load_depth(z_path)
        if z.shape != rgb.shape[:2]:
            raise ImageReadError(f"depth map {z_path} is {z.shape[1]}x{z.shape[0]} but its image {rgb_path} is "
                                 f"{rgb.shape[1]}x{rgb.shape[0]}")
        rendering, foreground = render_depth(z, z_path)
        rgb[~foreground] = 0
        images = [Image.fromarray(rgb)]
        return images + [Image.fromarray(rendering)] if self.modality == "rgbd" else images
