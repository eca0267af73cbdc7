"""Dinomaly2's datasets and multi-view metrics: BTAD, MIAD, Uni-Medical, Real-IAD Variety and MANTA-Tiny on
miniatures of their published layouts, masks paired by name, and the object-level metrics against a
direct computation of their definition."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from conftest import ROOT, run_script
from datasets import DatasetLayoutError, TestSample, TestSet, build_test_set, build_train_set, dataset_classes
from utils.config import DEFAULTS, ConfigError, load_config, validate
from utils.evaluation import OBJECT_COLUMNS, ClassOutputs, EvaluationResult, metrics_row, write_tables

SIZES = {"image_size": 64, "crop_size": 56}


def _image(path: Path, value, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, value if isinstance(value, tuple) else (value,) * 3).save(path)


def _mask(path: Path, box: tuple[int, int, int, int], size=(40, 30)) -> None:
    """A mask with 255 inside `box` (left, top, right, bottom)."""
    array = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = box
    array[top:bottom, left:right] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mvtec_like(root: Path, classes, normal: str, image_ext: str, mask_name) -> None:
    """Per class: 3 training and 2 normal test images, 3 defect images whose masks mark a box at a
    column given by the image's number, so a mask paired with the wrong image is visible."""
    for cls in classes:
        for i in range(3):
            _image(root / cls / "train" / normal / f"{i:03d}{image_ext}", 90)
        for i in range(2):
            _image(root / cls / "test" / normal / f"{i:03d}{image_ext}", 90)
        for i in range(3):
            _image(root / cls / "test" / "defect" / f"{i:03d}{image_ext}", 20)
            _mask(root / cls / "ground_truth" / "defect" / mask_name(f"{i:03d}"), (10 * i, 0, 10 * i + 5, 5))


def _cfg(dataset: str, root: Path, **extra) -> dict:
    return {**DEFAULTS, "dataset": dataset, "data_path": str(root), **SIZES, **extra}


def _marked_column(mask: torch.Tensor) -> int:
    """The left edge, in the 40-pixel-wide original, of the box a _mask drew (after resize to 64)."""
    columns = torch.nonzero(mask[0].any(dim=0)).flatten()
    return round(float(columns[0] + 4) * 40 / 64 / 10) * 10  # +4: the centre crop of 56 from 64


@pytest.mark.parametrize("dataset,classes,normal,image_ext,mask_name", [
    ("btad", ["01", "02", "03"], "ok", ".bmp", lambda stem: f"{stem}.png"),
    ("miad", ["catenary_dropper", "witness_mark"], "good", ".png", lambda stem: f"{stem}_mask.png"),
    ("unimedical", ["BraTS2021", "LIVER", "RESC"], "good", ".png", lambda stem: f"{stem}.bmp"),
])
def test_2d_loaders_read_each_layout_and_pair_masks_by_name(tmp_path, dataset, classes, normal, image_ext, mask_name):
    _mvtec_like(tmp_path, classes, normal, image_ext, mask_name)
    cfg = _cfg(dataset, tmp_path, classes=classes[:2])
    if dataset != "miad":
        assert dataset_classes({**cfg, "classes": None}) == classes
    train = build_train_set(cfg, dataset_classes(cfg))
    assert len(train) == 6 and all(path.parent.name == normal for path, _ in train.samples)
    test = build_test_set(cfg, classes[0])
    assert [(s.defect, s.label) for s in test.samples] == [("defect", 1)] * 3 + [("good", 0)] * 2
    for index, sample in enumerate(test.samples[:3]):
        assert Path(sample.mask).name == mask_name(sample.image.stem)
        assert _marked_column(test[index][1]) == 10 * index


def test_a_missing_mask_is_an_error_not_a_shifted_pairing(tmp_path):
    """Sorted-position pairing (the released loader's) would give image 001 the mask of 002 here."""
    _mvtec_like(tmp_path, ["01"], "ok", ".png", lambda stem: f"{stem}.png")
    masks = tmp_path / "01" / "ground_truth" / "defect"
    (masks / "001.png").unlink()
    with pytest.raises(DatasetLayoutError, match=f"defect image {tmp_path / '01/test/defect/001.png'} has no mask"):
        build_test_set(_cfg("btad", tmp_path), "01")
    (masks / "001.png").write_bytes((masks / "000.png").read_bytes())
    _mask(masks / "007.png", (0, 0, 5, 5))
    with pytest.raises(DatasetLayoutError, match=f"mask {masks / '007.png'} has no image"):
        build_test_set(_cfg("btad", tmp_path), "01")


def test_good_and_ok_together_are_ambiguous(tmp_path):
    _mvtec_like(tmp_path, ["01"], "ok", ".png", lambda stem: f"{stem}.png")
    _image(tmp_path / "01" / "train" / "good" / "000.png", 90)
    with pytest.raises(DatasetLayoutError, match="has both good/ and ok/"):
        build_train_set(_cfg("btad", tmp_path), ["01"])


@pytest.fixture
def variety_root(tmp_path) -> Path:
    """Real-IAD Variety: raw images (one class unzipped into itself), JSONs in realiadvariety_jsons, two
    objects of 5 views per test class, one anomalous view without a mask."""
    root = tmp_path / "Real-IAD_Variety"
    for cls, nested in (("2pin_block_plug", False), ("zipper_head", True)):
        images = root / "realiadvariety_raw" / cls / (cls if nested else "")
        split = {"train": [], "test": []}
        for sample, kind in enumerate(("OK", "OK", "OK", "NG")):
            for view in range(1, 6):
                image = f"{kind}/S{sample:04d}/{cls}_{sample:04d}_C{view}.jpg"
                _image(images / image, 40 * view)
                mask = image.replace(".jpg", ".png") if kind == "NG" and view != 5 else None
                if mask:
                    _mask(images / mask, (0, 0, 5, 5))
                split["train" if sample < 2 else "test"].append(
                    {"image_path": image, "anomaly_class": kind, "mask_path": mask})
        path = root / "realiadvariety_jsons" / f"{cls}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(split))
    return root


def test_realiad_variety_layout_objects_and_maskless_views(variety_root):
    cfg = _cfg("realiad_variety", variety_root, classes=None)
    assert dataset_classes(cfg) == ["2pin_block_plug", "zipper_head"]
    train = build_train_set(cfg, dataset_classes(cfg))
    assert len(train) == 2 * 2 * 5
    assert train.samples[-1][0] == (variety_root / "realiadvariety_raw/zipper_head/zipper_head"
                                    / "OK/S0001/zipper_head_0001_C5.jpg")
    with pytest.raises(DatasetLayoutError, match="test entry 9 lacks mask_path"):
        build_test_set(cfg, "zipper_head")
    test = build_test_set({**cfg, "realiad_maskless": "normal"}, "zipper_head")
    assert [s.label for s in test.samples] == [0] * 5 + [1, 1, 1, 1, 0]
    assert [s.object_id for s in test.samples] == ["OK/S0002"] * 5 + ["NG/S0003"] * 5
    with pytest.raises(DatasetLayoutError, match="realiadvariety_1024/2pin_block_plug/OK/S0000"):
        build_train_set({**cfg, "realiad_images": "realiadvariety_1024"}, ["2pin_block_plug"])
    with pytest.raises(ConfigError, match="realiad_split 'sv': Real-IAD Variety has one split"):
        validate({"dataset": "realiad_variety", "realiad_split": "sv"}, note=lambda _: None)


VIEW_COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]


def _manta_file(path: Path) -> None:
    """Five 256 x 256 views side by side, each one flat colour."""
    array = np.concatenate([np.full((256, 256, 3), c, np.uint8) for c in VIEW_COLOURS], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def manta_root(tmp_path) -> Path:
    root = tmp_path / "MANTATiny"
    for cls in ("agriculture/maize", "medicine/capsule"):
        for i in range(2):
            _manta_file(root / cls / "train" / "good" / f"{i:03d}.png")
        _manta_file(root / cls / "test" / "good" / "000.png")
        _manta_file(root / cls / "test" / "crack" / "000.png")
        _mask(root / cls / "ground_truth" / "crack" / "000.png", (2 * 256 + 10, 50, 2 * 256 + 20, 60), (1280, 256))
    return root


def _view_of(image: torch.Tensor) -> int:
    """Which VIEW_COLOURS a normalised image shows (its dominant channels)."""
    channels = tuple(int(v > 0) for v in image.mean(dim=(1, 2)))
    return [tuple(int(c > 0) for c in colour) for colour in VIEW_COLOURS].index(channels)


def test_manta_views_labels_and_random_training_views(manta_root):
    cfg = _cfg("manta", manta_root, classes=None, image_size=56, crop_size=56)
    assert len(dataset_classes(cfg)) == 38 and dataset_classes(cfg)[0] == "agriculture/maize"
    test = build_test_set(cfg, "medicine/capsule")
    assert [(s.defect, s.view, s.label) for s in test.samples] == (
        [("crack", v, int(v == 2)) for v in range(5)] + [("good", v, 0) for v in range(5)])
    assert len({s.object_id for s in test.samples}) == 2
    for index, sample in enumerate(test.samples):
        image, mask, label, _ = test[index]
        assert _view_of(image) == sample.view and label == sample.label
        assert bool(mask.any()) == (sample.label == 1)
    train = build_train_set({**cfg, "classes": ["medicine/capsule"]}, ["medicine/capsule"])
    torch.manual_seed(0)
    drawn = [_view_of(train[i % len(train)][0]) for i in range(60)]
    assert set(drawn) == set(range(5)) and max(np.bincount(drawn)) < 25


def test_manta_errors(manta_root):
    cfg = _cfg("manta", manta_root, classes=["agriculture/maize"])
    wrong = manta_root / "agriculture/maize/test/good/000.png"
    _image(wrong, 90, size=(1024, 256))
    with pytest.raises(DatasetLayoutError, match=f"MANTA-Tiny file {wrong} is 1024x256: expected 5 views"):
        build_test_set(cfg, "agriculture/maize")
    for key in ("image_cache", "cache_features"):
        with pytest.raises(ConfigError, match=f"{key} 'memory' cannot cache MANTA-Tiny"):
            validate({"dataset": "manta", key: "memory"}, note=lambda _: None)


def _direct_f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(np.max(2 * precision * recall / (precision + recall + 1e-7)))


def test_object_metrics_pool_all_views_pixels():
    """Objects of 1-5 views: score = mean of the top 1% of the pooled pixels of all views, label = any view."""
    generator = torch.Generator().manual_seed(3)
    views = [5, 5, 3, 5, 1, 4, 5, 2, 5, 5, 3, 5]
    samples, labels = [], []
    for obj, count in enumerate(views):
        anomalous_view = obj % 3 == 0 and count > 1
        for view in range(count):
            label = int(anomalous_view and view == 1)
            samples.append(TestSample(Path(f"{obj}_{view}.png"), None, label, "good", "c", object_id=f"object{obj}"))
            labels.append(label)
    n, size = len(samples), 32
    maps = torch.rand(n, size, size, generator=generator) ** 3
    labels = torch.tensor(labels)
    maps[labels == 1, 5:9, 5:9] += 0.6 * torch.rand(int(labels.sum()), 4, 4, generator=generator)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[labels == 1, 5:9, 5:9] = True
    scores = maps.flatten(1).topk(10, dim=1).values.mean(1)
    outputs = ClassOutputs(maps, scores, labels, masks, 0.0)
    row = metrics_row(outputs, {**DEFAULTS, "max_ratio": 0.01}, TestSet(samples, 64, 56, [0.5] * 3, [0.5] * 3))

    object_scores, object_labels, start = [], [], 0
    for count in views:
        pooled = np.sort(maps[start:start + count].numpy().ravel())[::-1]
        object_scores.append(pooled[:int(0.01 * pooled.size)].mean())
        object_labels.append(int(labels[start:start + count].max()))
        start += count
    object_scores, object_labels = np.array(object_scores), np.array(object_labels)
    assert row["O-AUROC"] == pytest.approx(roc_auc_score(object_labels, object_scores), abs=1e-12)
    assert row["O-AP"] == pytest.approx(average_precision_score(object_labels, object_scores), abs=1e-12)
    assert row["O-F1max"] == pytest.approx(_direct_f1max(object_labels, object_scores), abs=1e-6)
    assert 0 < row["O-AUROC"] < 1  # not a degenerate case

    single = [TestSample(s.image, None, s.label, "good", "c") for s in samples]
    assert not set(OBJECT_COLUMNS) & set(metrics_row(outputs, DEFAULTS, TestSet(single, 64, 56, [0.5] * 3, [0.5] * 3)))


def test_results_tables_carry_object_columns_only_for_multiview(tmp_path):
    base = {"I-AUROC": 0.9, "I-AP": 0.8, "I-F1max": 0.7, "P-AUROC": 0.6, "P-AP": 0.5, "P-F1max": 0.4, "AUPRO": 0.3,
            "mAD": 0.6}
    rows = {"a": {**base, "O-AUROC": 0.95, "O-AP": 0.9, "O-F1max": 0.85}, "b": {**base, "O-AUROC": 0.75, "O-AP": 0.7,
                                                                               "O-F1max": 0.65}}
    write_tables(tmp_path, EvaluationResult(rows, [], 0, 0.0))
    header, *lines = (tmp_path / "results.csv").read_text().splitlines()
    assert header.split(",")[-3:] == list(OBJECT_COLUMNS)
    assert lines[-1].split(",")[-3:] == ["85.0000", "80.0000", "75.0000"]
    assert "| O-AUROC | O-AP | O-F1max |" in (tmp_path / "results.md").read_text()
    write_tables(tmp_path, EvaluationResult({"a": base}, [], 0, 0.0))
    assert "O-AUROC" not in (tmp_path / "results.csv").read_text()


def test_manta_run_reports_object_metrics(manta_root, tiny_weights, tmp_path):
    """The released multi-view setting, run on the miniature: results.csv has O-AUROC, O-AP and O-F1max."""
    run_script("train_uni.py", [
        "--config", ROOT / "configs" / "dinomaly2" / "manta_uni.yaml", "--data_path", manta_root,
        "--classes", "agriculture/maize,medicine/capsule", "--encoder", "dinov2_vit_tiny_14",
        "--encoder_weights", tiny_weights, "--image_size", "56", "--crop_size", "56", "--batch_size", "2",
        "--total_iters", "3", "--warmup_iters", "1", "--eval_every", "0", "--device", "cpu", "--num_workers", "0",
        "--output_dir", tmp_path / "runs", "--run_name", "manta"])
    header, *lines = (tmp_path / "runs" / "manta" / "results.csv").read_text().splitlines()
    assert header.split(",")[-3:] == list(OBJECT_COLUMNS)
    assert [line.split(",")[0] for line in lines] == ["agriculture/maize", "medicine/capsule", "mean"]


@pytest.mark.parametrize("name,dataset,sizes", [
    ("btad_uni", "btad", (392, 392)), ("miad_uni", "miad", (392, 392)), ("unimedical_uni", "unimedical", (280, 280)),
    ("realiad_uni", "realiad", (448, 392)), ("realiad_variety_uni", "realiad_variety", (280, 280)),
    ("manta_uni", "manta", (280, 280)),
])
def test_dinomaly2_dataset_settings(name, dataset, sizes):
    cfg = validate(load_config(ROOT / "configs" / "dinomaly2" / f"{name}.yaml"), note=lambda _: None)
    assert (cfg["dataset"], cfg["image_size"], cfg["crop_size"]) == (dataset, *sizes)
    assert cfg["recenter"] and cfg["bottleneck"] == "two_stage" and cfg["lr_schedule"] == "v2"
    multiview = dataset in ("realiad", "realiad_variety", "manta")
    assert cfg["total_iters"] == (100000 if multiview else 40000)
    assert cfg["encoder"] == ("dinov2reg_vit_base_14" if multiview else "dinov2reg_vit_small_14")
    assert cfg["bottleneck_first_lr"] == (None if multiview else 2e-4)
