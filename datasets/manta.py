"""MANTA-Tiny: 38 classes in five domains; every file shows one object as five 256-pixel views side by side.

    <root>/<domain>/<class>/train/good/*.png
    <root>/<domain>/<class>/test/good/*.png
    <root>/<domain>/<class>/test/<defect>/*.png
    <root>/<domain>/<class>/ground_truth/<defect>/*.png     (1280 x 256, the views side by side too)

A class is named `<domain>/<class>`. Training draws one view of a file at random each time it is read
(the released loader); testing scores each view as an image, anomalous when its part of the mask has a
defect pixel, and each file is one object of the object-level metrics.
"""
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import folder
from .folder import VIEW_WIDTH, DatasetLayoutError, TestSample, image_size, load_image

VIEWS = 5
CLASSES = ["agriculture/maize", "agriculture/paddy", "agriculture/soybean", "agriculture/wheat",
           "electronics/block_inductor", "electronics/copper_standoff", "electronics/flat_nut", "electronics/led",
           "electronics/led_pad", "electronics/long_button", "electronics/power_inductor",
           "electronics/short_button", "electronics/thin_resistor", "electronics/type_c",
           "electronics/wafer_resistor",
           "groceries/coffee_beans", "groceries/goji_berries", "groceries/pistachios",
           "mechanics/button", "mechanics/gear", "mechanics/nut", "mechanics/nut_cap", "mechanics/red_washer",
           "mechanics/round_button_cap", "mechanics/screw", "mechanics/square_button_cap", "mechanics/terminal",
           "mechanics/wire_cap", "mechanics/yellow_green_washer",
           "medicine/capsule", "medicine/coated_tablet", "medicine/embossed_tablet", "medicine/lettered_tablet",
           "medicine/oblong_tablet", "medicine/pink_tablet", "medicine/red_tablet", "medicine/white_tablet",
           "medicine/yellow_tablet"]


def _check_views(path: Path) -> Path:
    width, height = image_size(path)
    if width != VIEWS * VIEW_WIDTH:
        raise DatasetLayoutError(f"MANTA-Tiny file {path} is {width}x{height}: expected {VIEWS} views of "
                                 f"{VIEW_WIDTH} px side by side, {VIEWS * VIEW_WIDTH} px wide")
    return path


def train_images(root: Path, class_name: str) -> list[Path]:
    return [_check_views(path) for path in folder.train_images(root, class_name)]


def view_labels(mask: Path) -> list[int]:
    """1 for each view whose part of the mask has a nonzero pixel (the released loader's view label)."""
    pixels = np.asarray(load_image(mask, "L"))
    return [int(pixels[:, v * VIEW_WIDTH:(v + 1) * VIEW_WIDTH].any()) for v in range(VIEWS)]


def list_test_samples(root: Path, class_name: str) -> list[TestSample]:
    samples = []
    for sample in folder.list_test_samples(root, class_name):
        _check_views(sample.image)
        labels = view_labels(_check_views(sample.mask)) if sample.mask is not None else [0] * VIEWS
        samples += [replace(sample, label=label, view=view, object_id=str(sample.image))
                    for view, label in enumerate(labels)]
    return samples
