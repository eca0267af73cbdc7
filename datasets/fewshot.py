"""Few-shot training sets (Dinomaly2): K images per class, drawn as the released few-shot script draws
them, written down so that a run can be repeated on exactly the same images."""
import random
from pathlib import Path

from .folder import DatasetLayoutError

SHOT_LIST = "shot_list.txt"  # what a run writes: one "<class>\t<path>" line per training image


def choose_shots(images_by_class: dict[str, list[Path]], shots: int, seed: int) -> dict[str, list[Path]]:
    """Python's random.sample of `shots` images from each class's sorted list, one generator seeded with
    `seed` (the authors': 1) drawing for the classes in order; the drawn order is kept."""
    rng = random.Random(seed)
    chosen = {}
    for name, images in images_by_class.items():
        if shots > len(images):
            raise DatasetLayoutError(f"--shots {shots}: class '{name}' has only {len(images)} training images")
        chosen[name] = rng.sample(sorted(images), shots)
    return chosen


def read_shot_list(path: Path, classes: list[str]) -> dict[str, list[Path]]:
    """The training images a shot_list.txt names, for `classes`; every file must exist."""
    if not path.is_file():
        raise FileNotFoundError(f"shot list not found: {path}")
    chosen = {name: [] for name in classes}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        name, _, image = line.partition("\t")
        if not image:
            raise DatasetLayoutError(f"{path}, line {number}: expected '<class><TAB><image path>', got {line!r}")
        if name not in chosen:
            raise DatasetLayoutError(f"{path}, line {number}: class '{name}' is not one of this run's classes")
        if not Path(image).is_file():
            raise DatasetLayoutError(f"{path}, line {number}: training image not found: {image}")
        chosen[name].append(Path(image))
    empty = [name for name, images in chosen.items() if not images]
    if empty:
        raise DatasetLayoutError(f"{path} names no training image of class {', '.join(empty)}")
    return chosen


def write_shot_list(path: Path, images_by_class: dict[str, list[Path]]) -> None:
    path.write_text("".join(f"{name}\t{image}\n" for name, images in images_by_class.items() for image in images))
