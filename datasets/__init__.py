"""Datasets chosen by the config's `dataset` key; all but Real-IAD use the MVTec AD folder layout."""
from pathlib import Path

from . import mvtec, realiad
from .mvtec import IMG_EXTENSIONS, DatasetLayoutError, TestSample, TestSet, TrainSet, check_files, load_image

CLASSES = {
    "mvtec": ["carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut",
              "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper"],
    "visa": ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
             "pcb3", "pcb4", "pipe_fryum"],
    "mpdd": ["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"],
    "realiad": realiad.CLASSES,
}


def dataset_classes(cfg: dict) -> list[str]:
    """The classes to use: `classes` from the config, else the dataset's own list (or, for a user's
    `folder` dataset, every sub-folder of data_path)."""
    root = Path(cfg["data_path"])
    if not root.is_dir():
        raise DatasetLayoutError(f"data_path does not exist or is not a folder: {root}")
    if cfg["classes"]:
        return list(cfg["classes"])
    if cfg["dataset"] in CLASSES:
        return CLASSES[cfg["dataset"]]
    found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())  # dataset: folder
    if not found:
        raise DatasetLayoutError(f"no class folders with a train/ folder under {root}")
    return found


def build_train_set(cfg: dict, class_names: list[str]) -> TrainSet:
    root = Path(cfg["data_path"])
    if cfg["dataset"] == "realiad":
        images = {name: realiad.train_images(root, name, cfg["realiad_split"]) for name in class_names}
    else:
        images = {name: mvtec.train_images(root, name) for name in class_names}
    return TrainSet(images, cfg["image_size"], cfg["crop_size"])


def build_test_set(cfg: dict, class_name: str) -> TestSet:
    root = Path(cfg["data_path"])
    if cfg["dataset"] == "realiad":
        samples = realiad.list_test_samples(root, class_name, cfg["realiad_split"])
    else:
        samples = mvtec.list_test_samples(root, class_name)
    return TestSet(samples, cfg["image_size"], cfg["crop_size"])


__all__ = ["CLASSES", "IMG_EXTENSIONS", "DatasetLayoutError", "TestSample", "TestSet", "TrainSet", "build_test_set",
           "build_train_set", "check_files", "dataset_classes", "load_image"]
