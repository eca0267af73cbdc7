"""VisA preparation, the Real-IAD loader, MPDD, the class-balanced sampler and every config,
on miniature raw layouts built here."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_script
from datasets import DatasetLayoutError, build_test_set, build_train_set, dataset_classes
from datasets.sampler import StepBatchSampler
from prepare_data.prepare_visa import prepare
from utils.config import DEFAULTS, load_config, validate


def _image(path: Path, value: int, size=(40, 30), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def _mask(path: Path, values: tuple[int, ...], size=(40, 30)) -> np.ndarray:
    array = np.zeros((size[1], size[0]), np.uint8)
    for i, v in enumerate(values):
        array[i * 3:(i + 1) * 3, :10] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


@pytest.fixture
def visa_download(tmp_path) -> Path:
    """Two classes in the official folder layout with split_csv/1cls.csv."""
    root = tmp_path / "VisA"
    rows = []
    for obj in ("candle", "pcb1"):
        for i in range(5):
            name = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _image(root / name, 100 + i)
            rows.append((obj, "train" if i < 3 else "test", "normal", name, ""))
        for i in range(2):
            name, mask = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _image(root / name, 200)
            _mask(root / mask, (1, 7, 255))
            rows.append((obj, "test", "anomaly", name, mask))
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def test_prepare_visa_writes_the_1cls_layout(visa_download, tmp_path):
    out = tmp_path / "VisA_pytorch"
    counts = prepare(visa_download, out)
    assert {k: dict(v) for k, v in counts.items()} == {c: {"train": 3, "test good": 2, "test bad": 2}
                                                       for c in ("candle", "pcb1")}
    base = out / "1cls" / "candle"
    assert sorted(p.name for p in (base / "train" / "good").iterdir()) == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert sorted(p.name for p in (base / "test" / "good").iterdir()) == ["0003.JPG", "0004.JPG"]
    assert sorted(p.name for p in (base / "test" / "bad").iterdir()) == ["000.JPG", "001.JPG"]
    original = np.array(Image.open(visa_download / "candle/Data/Masks/Anomaly/000.png"))
    written = np.array(Image.open(base / "ground_truth" / "bad" / "000.png"))
    assert np.array_equal(written, np.where(original != 0, 255, 0))
    assert (base / "train" / "good" / "0000.JPG").read_bytes() == (visa_download / "candle/Data/Images/Normal/0000.JPG").read_bytes()

    cfg = {**DEFAULTS, "dataset": "visa", "data_path": str(out / "1cls"), "classes": ["candle", "pcb1"], "image_size": 64,
           "crop_size": 56, "realiad_split": "mv"}
    assert len(build_train_set(cfg, ["candle", "pcb1"])) == 6
    test = build_test_set(cfg, "pcb1")
    assert [s.label for s in test.samples] == [1, 1, 0, 0]
    assert test.samples[0].mask == out / "1cls" / "pcb1" / "ground_truth" / "bad" / "000.png"


def test_prepare_visa_is_idempotent_and_names_missing_files(visa_download, tmp_path):
    out = tmp_path / "out"
    prepare(visa_download, out)
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert prepare(visa_download, out) == prepare(visa_download, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written
    (visa_download / "pcb1/Data/Masks/Anomaly/001.png").unlink()
    with pytest.raises(FileNotFoundError, match="pcb1/Data/Masks/Anomaly/001.png"):
        prepare(visa_download, tmp_path / "again")
    (visa_download / "candle/Data/Images/Normal/0004.JPG").unlink()
    result = run_script("prepare_data/prepare_visa.py", ["--data_folder", visa_download, "--save_folder",
                                                         tmp_path / "cli"], check=False)
    assert result.returncode != 0 and "candle/Data/Images/Normal/0004.JPG" in result.stderr
    result = run_script("prepare_data/prepare_visa.py", ["--data_folder", tmp_path, "--save_folder", out], check=False)
    assert result.returncode != 0 and str(tmp_path / "split_csv" / "1cls.csv") in result.stderr


@pytest.fixture
def realiad_root(tmp_path) -> Path:
    """Two classes; the multi-view JSON lists 5 views per sample, the single-view one only view 1."""
    root = tmp_path / "Real-IAD"
    for cls in ("audiojack", "usb"):
        splits = {"mv": {"train": [], "test": []}, "sv": {"train": [], "test": []}}
        for sample in range(4):
            kind = "OK" if sample < 3 else "AK"
            for view in range(1, 6):
                image = f"{kind}/S{sample:04d}/{cls}_{sample:04d}_C{view}.jpg"
                _image(root / "realiad_1024" / cls / image, 50 + view)
                entry = {"category": cls, "anomaly_class": kind, "image_path": image,
                         "mask_path": image.replace(".jpg", ".png") if kind != "OK" else None}
                if kind != "OK":
                    _mask(root / "realiad_1024" / cls / entry["mask_path"], (255,))
                phase = "train" if sample < 2 else "test"
                splits["mv"][phase].append(entry)
                if view == 1:
                    splits["sv"][phase].append(entry)
        for split, folder in (("mv", "realiad_jsons"), ("sv", "realiad_jsons_sv")):
            path = root / "realiad_jsons" / folder / f"{cls}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(splits[split]))
    return root


@pytest.mark.parametrize("split,views", [("mv", 5), ("sv", 1)])
def test_realiad_loader_counts_labels_and_masks(realiad_root, split, views):
    cfg = {**DEFAULTS, "dataset": "realiad", "data_path": str(realiad_root), "classes": None, "image_size": 64, "crop_size": 56,
           "realiad_split": split}
    assert len(dataset_classes(cfg)) == 30
    train = build_train_set(cfg, ["audiojack", "usb"])
    assert len(train) == 2 * 2 * views
    assert train.samples[0][0] == realiad_root / "realiad_1024" / "audiojack" / "OK/S0000/audiojack_0000_C1.jpg"
    test = build_test_set(cfg, "usb")
    assert [s.label for s in test.samples] == [0] * views + [1] * views
    anomalous = test.samples[-1]
    assert anomalous.defect == "AK" and anomalous.mask == anomalous.image.with_suffix(".png")
    image, mask, label, _ = test[len(test) - 1]
    assert label == 1 and mask.max() == 1.0


def test_realiad_errors_name_the_file(realiad_root):
    cfg = {**DEFAULTS, "dataset": "realiad", "data_path": str(realiad_root), "image_size": 64, "crop_size": 56,
           "realiad_split": "mv"}
    missing = realiad_root / "realiad_1024" / "usb" / "AK/S0003/usb_0003_C2.png"
    missing.unlink()
    with pytest.raises(DatasetLayoutError, match=f"file listed in usb.json not found: {missing}"):
        build_test_set(cfg, "usb")
    with pytest.raises(DatasetLayoutError, match="realiad_jsons/realiad_jsons/mint.json"):
        build_train_set(cfg, ["mint"])
    (realiad_root / "realiad_jsons" / "realiad_jsons" / "audiojack.json").write_text("{not json")
    with pytest.raises(DatasetLayoutError, match="audiojack.json: not a Real-IAD split file"):
        build_train_set(cfg, ["audiojack"])


def test_mpdd_uses_the_mvtec_layout(tmp_path):
    root = tmp_path / "MPDD"
    for cls in ("tubes", "connector"):
        for i in range(3):
            _image(root / cls / "train" / "good" / f"{i:03d}.png", 90)
        _image(root / cls / "test" / "good" / "000.png", 90)
        _image(root / cls / "test" / "anomalous" / "000.png", 20)
        _mask(root / cls / "ground_truth" / "anomalous" / "000_mask.png", (255,))
    cfg = {**DEFAULTS, "dataset": "mpdd", "data_path": str(root), "classes": ["tubes", "connector"], "image_size": 64,
           "crop_size": 56, "realiad_split": "mv"}
    assert len(build_train_set(cfg, dataset_classes(cfg))) == 6
    assert [(s.defect, s.label) for s in build_test_set(cfg, "tubes").samples] == [("anomalous", 1), ("good", 0)]
    assert dataset_classes({**cfg, "classes": None})[0] == "bracket_black"


def test_class_balanced_sampler_draws_classes_equally():
    class_ids = [0] * 900 + [1] * 100
    uniform = StepBatchSampler(1000, 50, 200, seed=1)
    balanced = StepBatchSampler(1000, 50, 200, seed=1, class_ids=class_ids)
    share = lambda sampler: np.mean([class_ids[i] for batch in sampler for i in batch])
    assert abs(share(uniform) - 0.1) < 0.02
    assert abs(share(balanced) - 0.5) < 0.02
    epoch = StepBatchSampler(1000, 50, 20, seed=1).epoch_batches(0)
    assert sorted(epoch.flatten().tolist()) == list(range(1000))  # uniform: a permutation per epoch


def test_one_command_per_dataset(visa_download, realiad_root, tiny_weights, tmp_path):
    prepare(visa_download, tmp_path / "visa")
    tiny = ["--encoder", "dinov2_vit_tiny_14", "--encoder_weights", tiny_weights, "--image_size", "64",
            "--crop_size", "56", "--batch_size", "2", "--total_iters", "3", "--warmup_iters", "1", "--device", "cpu",
            "--num_workers", "0", "--output_dir", tmp_path / "runs"]
    run_script("train_uni.py", ["--config", ROOT / "configs" / "visa_uni.yaml", "--data_path", tmp_path / "visa" / "1cls",
                                "--classes", "candle,pcb1", "--run_name", "visa"] + tiny)
    run_script("train_sep.py", ["--config", ROOT / "configs" / "realiad_sep.yaml", "--data_path", realiad_root,
                                "--classes", "audiojack,usb", "--realiad_split", "sv", "--run_name", "realiad"] + tiny)
    for run, classes in (("visa", ("candle", "pcb1")), ("realiad", ("audiojack", "usb"))):
        rows = (tmp_path / "runs" / run / "results.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == list(classes) + ["mean"]


@pytest.mark.parametrize("name,expected", [
    ("visa_uni", dict(dataset="visa", total_iters=10000, dropout=0.2, eps=1e-10)),
    ("visa_sep", dict(dataset="visa", total_iters=5000, dropout=0.2, eps=1e-8)),
    ("mpdd_sep", dict(dataset="mpdd", total_iters=5000, dropout=0.2, eps=1e-8)),
    ("realiad_uni", dict(dataset="realiad", total_iters=50000, dropout=0.4, eps=1e-10)),
    ("realiad_sep", dict(dataset="realiad", total_iters=5000, dropout=0.2, eps=1e-10)),
])
def test_configs_hold_each_settings_recipe(name, expected):
    cfg = validate(load_config(ROOT / "configs" / f"{name}.yaml"))
    mvtec = validate(load_config(ROOT / "configs" / "mvtec_uni.yaml"))
    for key, value in expected.items():
        assert cfg[key] == value, key
    same = {k for k in mvtec if k not in ("dataset", "data_path", "total_iters", "dropout", "eps", "eval_every")}
    assert all(cfg[k] == mvtec[k] for k in same)
