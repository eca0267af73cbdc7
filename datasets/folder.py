"""The generic folder loader: any dataset in the MVTec AD layout (MVTec AD, MPDD, prepared VisA, BTAD,
MIAD, Uni-Medical, MANTA-Tiny, your own).

    <root>/<class>/train/good/*.png
    <root>/<class>/test/good/*.png
    <root>/<class>/test/<defect>/*.png
    <root>/<class>/ground_truth/<defect>/<name>_mask.png   (or <name>.png; .bmp too)

The normal folders may be named `ok` instead of `good` (BTAD). Masks are paired to images by name,
never by position. The layout is checked when a dataset is built: a missing folder, an empty class, a
defect image without a mask or a mask without an image is an error naming the path, before any training.
With `masks: none` (image labels only) the ground_truth folder is not read at all: a defect image is an
anomalous image without a mask, and only the image metrics are computed.
"""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from torchvision import transforms as T

from .transforms import image_transform, mask_transform, strong_transform

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_FOLDERS = ("good", "ok")
EXPECTED_TREE = """expected layout (`ok` may stand for `good`):
  <data_path>/<class>/train/good/*.png
  <data_path>/<class>/test/good/*.png
  <data_path>/<class>/test/<defect>/*.png
  <data_path>/<class>/ground_truth/<defect>/<image name>_mask.png"""


VIEW_WIDTH = 256  # MANTA-Tiny: the width of each view in a file of views side by side
R = TypeVar("R")


class DatasetLayoutError(FileNotFoundError):
    pass


class ImageReadError(DatasetLayoutError, RuntimeError):
    """An image or mask that exists but cannot be decoded, or does not fit its partner."""


@dataclass(frozen=True)
class TestSample:
    __test__ = False  # not a pytest test class, despite the name
    image: Path
    mask: Optional[Path]
    label: int          # 0 normal, 1 anomalous
    defect: str         # "good" for normal images
    class_name: str
    object_id: Optional[str] = None  # multi-view sets: the object the view shows (object-level metrics)
    view: Optional[int] = None       # MANTA-Tiny: which of the views side by side in the file (crop_view)
    modality: Optional[str] = None   # MulSen-AD: RGB or Infrared (per-modality pixel metrics)
    object_label: Optional[int] = None  # MulSen-AD: the object's label, which also counts its point cloud


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"missing {what}: {path}\n{EXPECTED_TREE}")
    return path


def load_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Every pixel decoded: a truncated or corrupt file is a DatasetLayoutError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except Exception as error:
        raise ImageReadError(f"cannot decode image {path}: {error}") from None


def read_rgb(path: Path) -> list[Image.Image]:
    """The images a sample's file gives the model: here one RGB image (datasets/mvtec3d.py reads RGB-D)."""
    return [load_image(path)]


def to_input(transform: Callable, images: list[Image.Image]) -> torch.Tensor:
    """Each of a sample's images transformed, stacked on the channel axis (3 channels per image)."""
    tensors = [transform(image) for image in images]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def crop_view(image: Image.Image, view: int) -> Image.Image:
    """View number `view` of a file holding VIEW_WIDTH-pixel views side by side (MANTA-Tiny)."""
    return image.crop((view * VIEW_WIDTH, 0, (view + 1) * VIEW_WIDTH, image.height))


def image_size_decoded(path: Path) -> tuple[int, int]:
    return load_image(path).size


def image_size(path: Path) -> tuple[int, int]:
    """Width and height from the file header (cheap: no pixel is decoded)."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:
        raise DatasetLayoutError(f"cannot read image {path}: {error}") from None


def map_images(read: Callable[[Any], R], items: Sequence, desc: str, show: bool = True) -> list[R]:
    """`read` of every image on a thread pool (PIL releases the GIL while decoding), with a progress bar."""
    with ThreadPoolExecutor() as pool, tqdm(total=len(items), desc=desc, unit="image", disable=not show,
                                            leave=False) as progress:  # closed on an error too
        results = []
        for result in pool.map(read, items):
            results.append(result)
            progress.update()
        return results


def check_files(train_paths: list[Path], test_samples: list[TestSample], decode_train: bool,
                decode_test: bool) -> None:
    """Read every image and mask before training, in full (`decode_*`) or only their headers: a file
    that is not an image, is truncated, or a mask whose size differs from its image, is an error
    naming it now rather than hours into a run."""
    test_paths = [p for s in test_samples for p in (s.image, s.mask) if p is not None]
    sizes = {}
    for paths, decode in ((list(train_paths), decode_train), (test_paths, decode_test)):
        read = image_size_decoded if decode else image_size
        sizes.update(zip(paths, map_images(read, paths, "checking images", show=decode)))
    for sample in test_samples:
        size = sizes[sample.image]
        if sample.mask is not None and sizes[sample.mask] != size:
            mask_size = sizes[sample.mask]
            raise DatasetLayoutError(f"mask {sample.mask} is {mask_size[0]}x{mask_size[1]} but its image "
                                     f"{sample.image} is {size[0]}x{size[1]}")


def normal_folder(parent: Path, what: str) -> Path:
    """parent/good, or parent/ok where the dataset names it so (BTAD); both at once is ambiguous."""
    found = [parent / name for name in NORMAL_FOLDERS if (parent / name).is_dir()]
    if len(found) > 1:
        raise DatasetLayoutError(f"{parent} has both good/ and ok/: keep one folder of normal images")
    return found[0] if found else _require_dir(parent / "good", what)


def train_images(root: Path, class_name: str) -> list[Path]:
    folder = normal_folder(Path(root) / class_name / "train", f"training folder of class '{class_name}'")
    images = list_images(folder)
    if not images:
        raise DatasetLayoutError(f"no training images in {folder}")
    return images


def _pair_masks(images: list[Path], mask_dir: Path) -> list[Path]:
    masks = {p.stem: p for p in list_images(mask_dir)}
    paired, used = [], set()
    for image in images:
        stem = next((s for s in (f"{image.stem}_mask", image.stem) if s in masks), None)
        if stem is None:
            raise DatasetLayoutError(f"defect image {image} has no mask: expected {mask_dir / image.stem}_mask.png or "
                                     f"{image.stem}.png there (.bmp and .jpg are read too)")
        paired.append(masks[stem])
        used.add(stem)
    orphans = sorted(set(masks) - used)
    if orphans:
        raise DatasetLayoutError(f"mask {masks[orphans[0]]} has no image in {images[0].parent}"
                                 + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""))
    return paired


def list_test_samples(root: Path, class_name: str, masks: str = "required") -> list[TestSample]:
    """The test images of a class with their labels and, with `masks` required, their paired masks."""
    class_dir = _require_dir(Path(root) / class_name, f"class folder '{class_name}'")
    test_dir = _require_dir(class_dir / "test", f"test folder of class '{class_name}'")
    normal_dir = normal_folder(test_dir, f"normal test images of class '{class_name}'")
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        images = list_images(defect_dir)
        if defect_dir == normal_dir:
            samples += [TestSample(p, None, 0, "good", class_name) for p in images]
            continue
        if masks == "none":
            samples += [TestSample(p, None, 1, defect_dir.name, class_name) for p in images]
            continue
        mask_dir = _require_dir(class_dir / "ground_truth" / defect_dir.name, f"masks of defect '{defect_dir.name}' "
                                "(a data set with image labels only: --masks none)")
        samples += [TestSample(p, m, 1, defect_dir.name, class_name) for p, m in zip(images, _pair_masks(images, mask_dir))]
    if not any(s.label == 0 for s in samples) or not any(s.label == 1 for s in samples):
        raise DatasetLayoutError(f"{test_dir} needs both normal (test/{normal_dir.name}) and defect images for "
                                 "evaluation")
    return samples


class TrainSet(Dataset):
    """Normal training images of several classes, concatenated; items are (image, sample index).

    With `views` > 1 each file holds that many views side by side (MANTA-Tiny) and an item is one of
    them drawn at random (torch's RNG), as the released loader trains on them.
    With `modalities` m > 1 each class lists every object's m images one after the other (MulSen-AD:
    RGB, infrared); samples are then ordered modality by modality, so that sample o + k * n is image k of
    object o of n (what StepBatchSampler's `modalities` relies on). `read` turns a file into the images of
    one sample (read_rgb; an RGB image and its depth rendering for MVTec 3D-AD)."""

    def __init__(self, images_by_class: dict[str, list[Path]], image_size: int, crop_size: int,
                 mean: Sequence[float], std: Sequence[float], augment: str = "none", views: int = 1,
                 modalities: int = 1, read: Callable[[Path], list[Image.Image]] = read_rgb):
        self.read = read
        self.class_names = list(images_by_class)
        listed = [(path, i) for i, name in enumerate(self.class_names) for path in images_by_class[name]]
        self.samples = [sample for k in range(modalities) for sample in listed[k::modalities]]
        self.modalities = modalities
        self.augment = augment
        self.views = views
        self.transform = (strong_transform if augment == "strong" else image_transform)(image_size, crop_size,
                                                                                         mean, std)
        self.cache = None

    def use_cache(self, cache) -> None:
        """Read resized uint8 pixels from `cache` (N x S x S x 3) instead of decoding files (the strong
        augmentation's PIL operations get them back as the PIL image they came from)."""
        self.cache = cache
        rest = self.transform.transforms[1:]  # drop the Resize
        self.transform = self.transform.__class__(([T.ToPILImage()] if self.augment == "strong" else []) + rest)

    def __len__(self) -> int:
        return len(self.samples)

    def images_by_class(self) -> dict[str, list[Path]]:
        return {name: [path for path, c in self.samples if c == i] for i, name in enumerate(self.class_names)}

    @property
    def random_reads(self) -> bool:
        """Whether a read draws random numbers: the strong augmentation, or a MANTA-Tiny view."""
        return self.augment == "strong" or self.views > 1

    def __getitem__(self, item: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int]:
        """`item`: a sample index, or (index, draw) from StepBatchSampler(draws=True). `draw` seeds this
        read's random choices and leaves torch's random stream as it was, so the images of a step depend on
        (seed, step) alone: the same with any num_workers, and after resuming."""
        index, draw = item if isinstance(item, tuple) else (item, None)
        if draw is None:
            return self._read(index), index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw)
            return self._read(index), index

    def _read(self, index: int) -> torch.Tensor:
        if self.cache is not None:
            return self.transform(np.array(self.cache[index]))  # a copy: the cache may be read-only
        images = self.read(self.samples[index][0])
        if self.views > 1:
            view = int(torch.randint(self.views, ()))
            images = [crop_view(image, view) for image in images]
        return to_input(self.transform, images)


class TestSet(Dataset):
    """Test images of one class; items are (image, mask 1 x H x W in [0, 1], label, index)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, samples: list[TestSample], image_size: int, crop_size: int, mean: Sequence[float],
                 std: Sequence[float], read: Callable[[Path], list[Image.Image]] = read_rgb):
        self.read = read
        self.samples = samples
        self.crop_size = crop_size
        self.transform = image_transform(image_size, crop_size, mean, std)
        self.mask_transform = mask_transform(image_size, crop_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        sample = self.samples[index]
        images = self.read(sample.image)
        image = images[0]
        if sample.mask is None:
            mask = torch.zeros(1, self.crop_size, self.crop_size)
        else:
            mask_image = load_image(sample.mask, "L")
            if mask_image.size != image.size:
                raise ImageReadError(f"mask {sample.mask} is {mask_image.size[0]}x{mask_image.size[1]} but its image "
                                   f"{sample.image} is {image.size[0]}x{image.size[1]}")
            mask = self.mask_transform(mask_image if sample.view is None else crop_view(mask_image, sample.view))
        if sample.view is not None:
            images = [crop_view(image, sample.view) for image in images]
        return to_input(self.transform, images), mask, sample.label, index
