"""MulSen-AD (ZZZBBBZZZ/MulSen-AD): 15 classes, each object seen as an RGB image, an infrared image (grey
scale, read as RGB) and a point cloud. Dinomaly2 trains one model on the RGB and infrared images; the point
cloud is never read.

    <root>/<class>/RGB/train/<N>.png
    <root>/<class>/RGB/test/<defect>/<N>.png           (test/good: normal objects)
    <root>/<class>/RGB/GT/<defect>/<N>.png             (the RGB mask, where the RGB label is 1)
    <root>/<class>/RGB/GT/<defect>/data.csv            (header, then rows: object, rgb, infrared, pointcloud)
    <root>/<class>/Infrared/{train,test,GT}/...        (the same names; no data.csv)
    <root>/<class>/Pointcloud/...                      (not used)

An object is file <N>.png in RGB and in Infrared, paired by that name. Its three 0/1 labels come from its
defect's data.csv: a row whose first column names <N> (as N or N.png) is that object's; a CSV whose first
column names no file is read as the released loader reads every CSV, row i = the i-th file in numeric
order. Each image is a test sample with its own modality's label and mask; the object is anomalous when
any of the three labels is 1, point cloud included (the released label; the point cloud is never scored).
"""
import csv
import re
from dataclasses import dataclass
from pathlib import Path

from .folder import DatasetLayoutError, TestSample

CLASSES = ["capsule", "cotton", "cube", "spring_pad", "screw", "screen", "piggy", "nut", "flat_pad",
           "plastic_cylinder", "zipper", "button_cell", "toothbrush", "solar_panel", "light"]
MODALITIES = ("RGB", "Infrared")  # the order of a training batch: the RGB halves, then the infrared ones
LABELS_CSV = "data.csv"
NUMBERED = re.compile(r"(\d+)\.png$")


@dataclass(frozen=True)
class ObjectLabels:
    rgb: int
    infrared: int
    pointcloud: int

    def of(self, modality: str) -> int:
        return self.rgb if modality == "RGB" else self.infrared


def _numbered_images(folder: Path) -> dict[int, str]:
    """number -> file name of the <N>.png files of a folder (other files are ignored, as released)."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"missing MulSen-AD folder: {folder}\nexpected <data_path>/<class>/{{RGB,Infrared}}/"
                                 "{train,test/<defect>,GT/<defect>}/<N>.png")
    found = {}
    for path in folder.iterdir():
        match = NUMBERED.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path.name
    return found


def _paired_objects(class_dir: Path, part: str) -> list[str]:
    """The file names under <modality>/<part> present in RGB and infrared alike, in numeric order."""
    rgb, infrared = (_numbered_images(class_dir / m / part) for m in MODALITIES)
    if rgb.keys() != infrared.keys():
        lonely = min(rgb.keys() ^ infrared.keys())
        has, lacks = ("RGB", "Infrared") if lonely in rgb else ("Infrared", "RGB")
        raise DatasetLayoutError(f"{class_dir / has / part / f'{lonely}.png'} has no partner in "
                                 f"{class_dir / lacks / part}: every object needs an RGB and an infrared image")
    if not rgb:
        raise DatasetLayoutError(f"no <N>.png images in {class_dir / 'RGB' / part}")
    return [rgb[n] for n in sorted(rgb)]


def train_pairs(root: Path, class_name: str) -> list[tuple[Path, Path]]:
    """(RGB, infrared) image of every training object of a class."""
    class_dir = Path(root) / class_name
    return [tuple(class_dir / m / "train" / name for m in MODALITIES) for name in _paired_objects(class_dir, "train")]


def read_labels(path: Path, names: list[str]) -> dict[str, ObjectLabels]:
    """file name -> labels of a defect's data.csv (see the module docstring for the pairing)."""
    if not path.is_file():
        raise DatasetLayoutError(f"missing MulSen-AD label file {path} (header, then: object, rgb, infrared, "
                                 "pointcloud)")
    with open(path, newline="") as f:
        rows = [row for row in list(csv.reader(f))[1:] if row]
    labels = []
    for i, row in enumerate(rows, start=2):
        if len(row) < 4 or any(v.strip() not in ("0", "1") for v in row[1:4]):
            raise DatasetLayoutError(f"{path} line {i}: expected object, rgb, infrared, pointcloud labels (0 or 1), "
                                     f"got {','.join(row)}")
        labels.append((Path(row[0].strip()).stem, ObjectLabels(*(int(v) for v in row[1:4]))))
    stems = {Path(name).stem: name for name in names}
    if len(labels) != len(names):
        test_dir = path.parents[2] / "test" / path.parent.name
        raise DatasetLayoutError(f"{path} has {len(labels)} rows but {test_dir} has {len(names)} objects")
    if {key for key, _ in labels} == stems.keys():
        return {stems[key]: value for key, value in labels}
    return {name: value for name, (_, value) in zip(names, labels)}  # the released reading: by position


def list_test_samples(root: Path, class_name: str) -> list[TestSample]:
    """Per object, its RGB then its infrared image, each with its modality's label and mask."""
    class_dir = Path(root) / class_name
    test_dir = class_dir / "RGB" / "test"
    if not test_dir.is_dir():
        raise DatasetLayoutError(f"missing MulSen-AD test folder: {test_dir}")
    samples = []
    for defect in sorted(p.name for p in test_dir.iterdir() if p.is_dir()):
        names = _paired_objects(class_dir, f"test/{defect}")
        normal = ObjectLabels(0, 0, 0)
        labels = ({n: normal for n in names} if defect == "good"
                  else read_labels(class_dir / "RGB" / "GT" / defect / LABELS_CSV, names))
        for name in names:
            for modality in MODALITIES:
                label = labels[name].of(modality)
                mask = class_dir / modality / "GT" / defect / name if label else None
                if mask is not None and not mask.is_file():
                    raise DatasetLayoutError(f"{modality} image {class_dir / modality / 'test' / defect / name} is "
                                             f"labelled anomalous in {LABELS_CSV} but has no mask {mask}")
                samples.append(TestSample(class_dir / modality / "test" / defect / name, mask, label, defect,
                                          class_name, object_id=f"{defect}/{name}", modality=modality,
                                          object_label=max(labels[name].rgb, labels[name].infrared,
                                                           labels[name].pointcloud)))
    if all(s.object_label for s in samples) or not any(s.object_label for s in samples):
        raise DatasetLayoutError(f"MulSen-AD class '{class_name}' needs both normal and anomalous test objects "
                                 f"under {test_dir}")
    return samples
