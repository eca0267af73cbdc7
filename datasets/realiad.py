"""Real-IAD and Real-IAD Variety: images and masks under one folder per class, listed by one JSON file per class.

    Real-IAD          <root>/realiad_1024/<class>/...          <root>/realiad_jsons/realiad_jsons/<class>.json
                      (single view, --realiad_split sv:         <root>/realiad_jsons/realiad_jsons_sv/<class>.json)
    Real-IAD Variety  <root>/realiadvariety_raw/<class>/...    <root>/realiadvariety_jsons/<class>.json

`realiad_images` names another image folder (realiadvariety_1024, the Dinomaly2 README's downsampled
copy); a class folder unzipped into itself (<class>/<class>/) is found too. Each JSON holds "train" and
"test" lists of entries with image_path, mask_path and anomaly_class ("OK" = normal); paths are relative
to the class folder. The views of one object share the directory of their image_path: that directory is
the object of the object-level metrics.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from .folder import DatasetLayoutError, TestSample

CLASSES = ["audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
           "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
           "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1",
           "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper"]
JSON_FOLDERS = {"mv": "realiad_jsons/realiad_jsons", "sv": "realiad_jsons/realiad_jsons_sv"}
VARIETY_JSONS = "realiadvariety_jsons"


@dataclass(frozen=True)
class Layout:
    images: str            # the folder of class folders under the root
    jsons: str             # the folder of <class>.json split files under the root
    maskless: str          # an anomalous entry without mask_path: "error", or "normal" (Dinomaly2's reading)


def layout(cfg: dict) -> Layout:
    if cfg["dataset"] == "realiad_variety":
        return Layout(cfg["realiad_images"] or "realiadvariety_raw", VARIETY_JSONS, cfg["realiad_maskless"])
    return Layout(cfg["realiad_images"] or "realiad_1024", JSON_FOLDERS[cfg["realiad_split"]], cfg["realiad_maskless"])


def variety_classes(root: Path) -> list[str]:
    """Real-IAD Variety's classes (160): the split files found, sorted, as the released script lists them."""
    names = sorted(p.stem for p in (Path(root) / VARIETY_JSONS).glob("*.json"))
    if not names:
        raise DatasetLayoutError(f"no Real-IAD Variety split files <class>.json in {Path(root) / VARIETY_JSONS}")
    return names


def _class_folder(root: Path, class_name: str, where: Layout) -> Path:
    folder = Path(root) / where.images / class_name
    return folder / class_name if (folder / class_name).is_dir() else folder


def _entries(root: Path, class_name: str, where: Layout, phase: str) -> list[dict]:
    path = Path(root) / where.jsons / f"{class_name}.json"
    if not path.is_file():
        raise DatasetLayoutError(f"missing Real-IAD split file: {path}\n"
                                 f"expected <data_path>/{where.jsons}/<class>.json")
    try:
        entries = json.loads(path.read_text())[phase]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetLayoutError(f"{path}: not a Real-IAD split file with a '{phase}' list ({error})") from None
    if not entries:
        raise DatasetLayoutError(f"{path}: the '{phase}' list is empty")
    for i, entry in enumerate(entries):
        missing = [k for k in ("image_path", "anomaly_class") if k not in entry]
        if missing or (entry["anomaly_class"] != "OK" and not entry.get("mask_path") and where.maskless == "error"):
            raise DatasetLayoutError(f"{path}: {phase} entry {i} lacks {', '.join(missing) or 'mask_path'}")
    return entries


def _existing(path: Path, json_name: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"file listed in {json_name} not found: {path}")
    return path


def train_images(root: Path, class_name: str, where: Layout) -> list[Path]:
    images = _class_folder(root, class_name, where)
    entries = _entries(root, class_name, where, "train")
    return [_existing(images / e["image_path"], f"{class_name}.json") for e in entries if e["anomaly_class"] == "OK"]


def list_test_samples(root: Path, class_name: str, where: Layout) -> list[TestSample]:
    images = _class_folder(root, class_name, where)
    samples = []
    for e in _entries(root, class_name, where, "test"):
        normal = e["anomaly_class"] == "OK" or not e.get("mask_path")  # maskless: refused above unless "normal"
        mask = None if normal else _existing(images / e["mask_path"], f"{class_name}.json")
        samples.append(TestSample(_existing(images / e["image_path"], f"{class_name}.json"), mask, int(not normal),
                                  "good" if normal else e["anomaly_class"], class_name,
                                  object_id=str(Path(e["image_path"]).parent)))
    if all(s.label for s in samples) or not any(s.label for s in samples):
        raise DatasetLayoutError(f"Real-IAD class '{class_name}' needs both normal and anomalous test images")
    return samples
