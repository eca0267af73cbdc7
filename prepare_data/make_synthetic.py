"""Write a small synthetic dataset in the MVTec AD layout: textures with drawn defects and their masks.

    python prepare_data/make_synthetic.py demo_data            # 3 classes, a few seconds

Each class is a periodic texture (stripes, checkerboard, dots) with a random shift and noise per image.
Defective test images carry a scratch, a blob or a hole, and ground_truth/ holds their masks, so the
whole pipeline (training, metrics, heatmaps) can be watched on a CPU without downloading MVTec AD.
"""
import argparse
from pathlib import Path

import cv2
import numpy as np

TEXTURES = ("stripes", "checker", "dots")
DEFECTS = ("scratch", "blob", "hole")


def texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size x 3 uint8 texture of `kind`, randomly shifted, with mild pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = rng.uniform(0, 32, size=2)
    if kind == "stripes":
        value = 0.5 + 0.5 * np.sin((xx + yy + dx) * 2 * np.pi / 16)
        colors = np.array([[40, 90, 160], [200, 210, 230]], np.float32)
    elif kind == "checker":
        value = (((xx + dx) // 16 + (yy + dy) // 16) % 2).astype(np.float32)
        colors = np.array([[60, 60, 60], [170, 150, 120]], np.float32)
    elif kind == "dots":
        value = (((xx + dx) % 20 - 10) ** 2 + ((yy + dy) % 20 - 10) ** 2 < 30).astype(np.float32)
        colors = np.array([[210, 200, 180], [90, 50, 40]], np.float32)
    else:
        raise ValueError(f"unknown texture '{kind}'; choose from {TEXTURES}")
    image = colors[0] * (1 - value[..., None]) + colors[1] * value[..., None]
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Draw a defect of `kind` into `image` (in place) and return its uint8 mask (255 = defect)."""
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], np.uint8)
    lo, hi = size // 5, size - size // 5
    cx, cy = (int(v) for v in rng.integers(lo, hi, size=2))
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.15, 0.3) * size
        p1 = (int(cx - length * np.cos(angle)), int(cy - length * np.sin(angle)))
        p2 = (int(cx + length * np.cos(angle)), int(cy + length * np.sin(angle)))
        thickness = max(2, size // 48)
        for target, value in ((image, color), (mask, 255)):
            cv2.line(target, p1, p2, value, thickness)
    elif kind == "blob":
        axes = tuple(int(v) for v in rng.integers(size // 20, size // 9, size=2))
        angle = float(rng.uniform(0, 180))
        for target, value in ((image, color), (mask, 255)):
            cv2.ellipse(target, (cx, cy), axes, angle, 0, 360, value, -1)
    elif kind == "hole":
        radius = int(rng.integers(size // 22, size // 12))
        for target, value in ((image, (15, 15, 15)), (mask, 255)):
            cv2.circle(target, (cx, cy), radius, value, -1)
        cv2.circle(image, (cx, cy), radius, (120, 120, 120), max(1, size // 128))
    else:
        raise ValueError(f"unknown defect '{kind}'; choose from {DEFECTS}")
    return mask


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image[..., ::-1] if image.ndim == 3 else image
    if not cv2.imwrite(str(path), data):
        raise OSError(f"could not write {path}")


def make_dataset(out_dir: str, num_classes: int = 3, num_train: int = 40, num_test_good: int = 10,
                 num_test_defect: int = 5, size: int = 256, seed: int = 0) -> list[str]:
    """Write the dataset and return its class names (the first `num_classes` of TEXTURES)."""
    if not 1 <= num_classes <= len(TEXTURES):
        raise ValueError(f"num_classes must be 1..{len(TEXTURES)}")
    rng = np.random.default_rng(seed)
    root = Path(out_dir)
    classes = list(TEXTURES[:num_classes])
    for kind in classes:
        for i in range(num_train):
            _write(root / kind / "train" / "good" / f"{i:03d}.png", texture(kind, size, rng))
        for i in range(num_test_good):
            _write(root / kind / "test" / "good" / f"{i:03d}.png", texture(kind, size, rng))
        for defect in DEFECTS:
            for i in range(num_test_defect):
                image = texture(kind, size, rng)
                mask = draw_defect(image, defect, rng)
                _write(root / kind / "test" / defect / f"{i:03d}.png", image)
                _write(root / kind / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return classes


def rgbd_sample(size: int, shift: tuple[int, int], rng: np.random.Generator,
                defect: str = "good") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB, z, mask) of a prepared MVTec 3D-AD sample: a dome (z 0.6 m at the rim, nearer at the top) on a 0
    background, shifted by `shift` px, under one fixed RGB pattern that moves with it. A `bump` or `dent`
    changes only z: the RGB image is that of a normal sample with the same shift."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = size / 2 + shift[0], size / 2 + shift[1]
    radius = 0.35 * size
    distance = np.hypot(yy - cy, xx - cx) / radius
    inside = distance < 1
    z = np.where(inside, 0.6 - rng.uniform(0.018, 0.022) * np.sqrt(np.clip(1 - distance ** 2, 0, 1)), 0)
    pattern = 128 + 60 * np.sin((xx - cx) / 3) * np.cos((yy - cy) / 4)
    rgb = np.stack([pattern, 255 - pattern, np.full_like(pattern, 90)], -1).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    if defect != "good":
        angle, r = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5 * radius)
        by, bx = cy + r * np.sin(angle), cx + r * np.cos(angle)
        blob = np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * (size / 16) ** 2))
        z = np.where(inside, z + (-1 if defect == "bump" else 1) * 0.01 * blob, 0)
        mask[blob > 0.5] = 255
    return rgb, z.astype(np.float32), mask


def make_rgbd_dataset(out_dir: str, num_train: int = 16, num_test_good: int = 8, num_test_defect: int = 4,
                      size: int = 64, seed: int = 0, class_name: str = "dome") -> None:
    """One class in the tree prepare_data/prepare_mvtec3d.py writes (rgb/, z/, gt/), its defects in depth only.
    The k-th defective test image has the shift, hence the RGB image, of the k-th normal test image (cycling
    when there are more defective ones): with 2 x num_test_defect <= num_test_good no RGB-only model can
    rank the defective images above the normal ones."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(out_dir) / class_name
    shifts = [tuple(rng.integers(-2, 3, 2)) for _ in range(num_train + num_test_good)]
    jobs = [("train", "good", i, shifts[i]) for i in range(num_train)]
    jobs += [("test", "good", i, shifts[num_train + i]) for i in range(num_test_good)]
    jobs += [("test", defect, i, shifts[num_train + (k * num_test_defect + i) % num_test_good])
             for k, defect in enumerate(("bump", "dent")) for i in range(num_test_defect)]
    for split, defect, i, shift in jobs:
        rgb, z, mask = rgbd_sample(size, shift, rng, defect)
        folder = root / split / defect
        _write(folder / "rgb" / f"{i:03d}.png", rgb)
        (folder / "z").mkdir(parents=True, exist_ok=True)
        Image.fromarray(z).save(folder / "z" / f"{i:03d}.tiff")
        if defect != "good":
            _write(folder / "gt" / f"{i:03d}.png", mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--classes", type=int, default=3, help=f"how many of {', '.join(TEXTURES)}")
    parser.add_argument("--train", type=int, default=40, help="normal training images per class")
    parser.add_argument("--test_good", type=int, default=10, help="normal test images per class")
    parser.add_argument("--test_defect", type=int, default=5, help="test images per defect type and class")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rgbd", action="store_true", help="one RGB-D class in the prepared MVTec 3D-AD tree instead, "
                        "its defects (bumps, dents) in depth only")
    args = parser.parse_args()
    if args.rgbd:
        make_rgbd_dataset(args.out_dir, args.train, args.test_good, args.test_defect, args.size, args.seed)
        print(f"wrote one RGB-D class (dome) to {args.out_dir}")
        return
    classes = make_dataset(args.out_dir, args.classes, args.train, args.test_good, args.test_defect, args.size,
                           args.seed)
    print(f"wrote {len(classes)} classes ({', '.join(classes)}) to {args.out_dir}")


if __name__ == "__main__":
    main()
