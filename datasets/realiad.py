"""Real-IAD: images and masks under <root>/realiad_1024/<class>/, listed by one JSON file per class.

    <root>/realiad_jsons/realiad_jsons/<class>.json       multi-view (all 5 views; the paper's setting)
    <root>/realiad_jsons/realiad_jsons_sv/<class>.json    single view (--realiad_split sv)

Each JSON holds "train" and "test" lists of entries with image_path, mask_path and anomaly_class
("OK" = normal); paths are relative to <root>/realiad_1024/<class>/.
"""
import json
from pathlib import Path

from .folder import DatasetLayoutError, TestSample

CLASSES = ["audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
           "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
           "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1",
           "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper"]
JSON_FOLDERS = {"mv": "realiad_jsons", "sv": "realiad_jsons_sv"}


def _entries(root: Path, class_name: str, split: str, phase: str) -> list[dict]:
    path = Path(root) / "realiad_jsons" / JSON_FOLDERS[split] / f"{class_name}.json"
    if not path.is_file():
        raise DatasetLayoutError(f"missing Real-IAD split file: {path}\n"
                                 f"expected <data_path>/realiad_jsons/{JSON_FOLDERS[split]}/<class>.json")
    try:
        entries = json.loads(path.read_text())[phase]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetLayoutError(f"{path}: not a Real-IAD split file with a '{phase}' list ({error})") from None
    if not entries:
        raise DatasetLayoutError(f"{path}: the '{phase}' list is empty")
    for i, entry in enumerate(entries):
        missing = [k for k in ("image_path", "anomaly_class") if k not in entry]
        if missing or (entry["anomaly_class"] != "OK" and not entry.get("mask_path")):
            raise DatasetLayoutError(f"{path}: {phase} entry {i} lacks {', '.join(missing) or 'mask_path'}")
    return entries


def _existing(path: Path, json_name: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"file listed in {json_name} not found: {path}")
    return path


def train_images(root: Path, class_name: str, split: str = "mv") -> list[Path]:
    images = Path(root) / "realiad_1024" / class_name
    entries = _entries(root, class_name, split, "train")
    return [_existing(images / e["image_path"], f"{class_name}.json") for e in entries if e["anomaly_class"] == "OK"]


def list_test_samples(root: Path, class_name: str, split: str = "mv") -> list[TestSample]:
    images = Path(root) / "realiad_1024" / class_name
    samples = []
    for e in _entries(root, class_name, split, "test"):
        normal = e["anomaly_class"] == "OK"
        mask = None if normal else _existing(images / e["mask_path"], f"{class_name}.json")
        samples.append(TestSample(_existing(images / e["image_path"], f"{class_name}.json"), mask, int(not normal),
                                  "good" if normal else e["anomaly_class"], class_name))
    if all(s.label for s in samples) or not any(s.label for s in samples):
        raise DatasetLayoutError(f"Real-IAD class '{class_name}' needs both normal and anomalous test images")
    return samples
