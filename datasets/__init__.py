"""Datasets chosen by the config's `dataset` key; all but the Real-IAD pair, MulSen-AD and MVTec 3D-AD use the MVTec AD
folder layout."""
from collections import Counter
from pathlib import Path

from models import input_normalization
from . import folder, manta, mulsen, mvtec3d, realiad
from .fewshot import choose_shots, read_shot_list
from .folder import (IMG_EXTENSIONS, DatasetLayoutError, TestSample, TestSet, TrainSet, check_files, load_image,
                     read_rgb)

CLASSES = {
    "mvtec": ["carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut",
              "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper"],
    "visa": ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
             "pcb3", "pcb4", "pipe_fryum"],
    "mpdd": ["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"],
    "btad": ["01", "02", "03"],
    "miad": ["catenary_dropper", "electrical_insulator", "metal_welding", "nut_and_bolt", "photovoltaic_module",
             "wind_turbine", "witness_mark"],
    "unimedical": ["BraTS2021", "LIVER", "RESC"],
    "realiad": realiad.CLASSES,
    "manta": manta.CLASSES,
    "mulsen": mulsen.CLASSES,
    "mvtec3d": mvtec3d.CLASSES,
}
REALIAD_STYLE = ("realiad", "realiad_variety")  # JSON-listed: datasets/realiad.py


def class_folder(name: str) -> str:
    """A class's folder name in a run directory (MANTA-Tiny's `<domain>/<class>` names flattened)."""
    return name.replace("/", "_")


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
    if cfg["dataset"] == "realiad_variety":
        return realiad.variety_classes(root)
    found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())  # dataset: folder
    if not found:
        raise DatasetLayoutError(f"no class folders with a train/ folder under {root}")
    return found


def sample_reader(cfg: dict):
    """What a sample's file gives the model: an RGB image, or for MVTec 3D-AD the RGB image blacked out off
    the object and, with modality rgbd, its depth rendering."""
    return mvtec3d.RGBDReader(cfg["modality"]) if cfg["dataset"] == "mvtec3d" else read_rgb


def build_train_set(cfg: dict, class_names: list[str]) -> TrainSet:
    root = Path(cfg["data_path"])
    if cfg["dataset"] in REALIAD_STYLE:
        images = {name: realiad.train_images(root, name, realiad.layout(cfg)) for name in class_names}
    elif cfg["dataset"] == "manta":
        images = {name: manta.train_images(root, name) for name in class_names}
    elif cfg["dataset"] == "mulsen":  # each object's RGB and infrared image, one after the other
        images = {name: [p for pair in mulsen.train_pairs(root, name) for p in pair] for name in class_names}
    elif cfg["dataset"] == "mvtec3d":
        images = {name: mvtec3d.train_images(root, name) for name in class_names}
    else:
        images = {name: folder.train_images(root, name) for name in class_names}
    if cfg["shot_list"]:
        images = read_shot_list(Path(cfg["shot_list"]), class_names)
    elif cfg["shots"]:
        images = choose_shots(images, cfg["shots"], cfg["seed"])
    return TrainSet(images, cfg["image_size"], cfg["crop_size"], *input_normalization(cfg), cfg["train_augment"],
                    views=manta.VIEWS if cfg["dataset"] == "manta" else 1,
                    modalities=len(mulsen.MODALITIES) if cfg["dataset"] == "mulsen" else 1, read=sample_reader(cfg))


def build_test_set(cfg: dict, class_name: str) -> TestSet:
    root = Path(cfg["data_path"])
    if cfg["dataset"] in REALIAD_STYLE:
        samples = realiad.list_test_samples(root, class_name, realiad.layout(cfg))
    elif cfg["dataset"] == "manta":
        samples = manta.list_test_samples(root, class_name)
    elif cfg["dataset"] == "mulsen":
        samples = mulsen.list_test_samples(root, class_name)
    elif cfg["dataset"] == "mvtec3d":
        samples = mvtec3d.list_test_samples(root, class_name)
    else:
        samples = folder.list_test_samples(root, class_name, cfg["masks"])
    return TestSet(samples, cfg["image_size"], cfg["crop_size"], *input_normalization(cfg), read=sample_reader(cfg))


def list_data(cfg: dict, class_names: list[str]) -> tuple[TrainSet, dict[str, TestSet]]:
    """Training images of all `class_names` and one test set per class, from the folder layout and the file
    names (a layout error names the folder); the images themselves are read by check_images."""
    return build_train_set(cfg, class_names), {name: build_test_set(cfg, name) for name in class_names}


def check_images(cfg: dict, train_set: TrainSet, test_sets: dict[str, TestSet]) -> None:
    """Every file of a listed data set read now (fully decoded with check_images: full), not hours into a run."""
    decode = cfg["check_images"] == "full"
    # the image cache decodes every training image in full before the first step: no need to do it twice
    check_files([path for path, _ in train_set.samples], [s for t in test_sets.values() for s in t.samples],
                decode_train=decode and cfg["image_cache"] == "none", decode_test=decode)


def load_data(cfg: dict, class_names: list[str]) -> tuple[TrainSet, dict[str, TestSet]]:
    """list_data, then check_images: the layout and every file checked, before any model exists."""
    train_set, test_sets = list_data(cfg, class_names)
    check_images(cfg, train_set, test_sets)
    return train_set, test_sets


def count_lines(train_set: TrainSet, test_sets: dict[str, TestSet]) -> list[str]:
    """One line per class: training images, normal and anomalous test images."""
    train_counts = Counter(train_set.class_names[i] for _, i in train_set.samples)
    lines = []
    for name, test_set in test_sets.items():
        labels = Counter(s.label for s in test_set.samples)
        lines.append(f"  {name:<14} train {train_counts[name]:5d}   test normal {labels[0]:4d}  anomalous {labels[1]:4d}")
    return lines


__all__ = ["CLASSES", "IMG_EXTENSIONS", "DatasetLayoutError", "TestSample", "TestSet", "TrainSet", "build_test_set",
           "build_train_set", "check_images", "class_folder", "check_files", "count_lines", "dataset_classes",
           "list_data", "load_data", "load_image", "sample_reader"]
