"""MulSen-AD (RGB-IR) on a miniature of its published layout: RGB and infrared paired by name, labels read
from data.csv by name (or by position, as released), batches half RGB half infrared of the same objects,
the per-modality and object metrics against a direct computation, and a class without an anomalous
infrared pixel giving empty cells, not a crash."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import train_uni
from conftest import run_in_process, tiny_run_args
from datasets import DatasetLayoutError, build_test_set, build_train_set
from datasets.sampler import StepBatchSampler
from reference_metrics import direct_aupro
from utils.config import DEFAULTS
from utils.curves import read_rows
from utils.evaluation import ClassOutputs, metrics_row

SIZE = 48  # the miniature's image side
# per class: defect objects (name, rgb, infrared, pointcloud label); "cotton" has no anomalous infrared pixel
# and an object anomalous only in its point cloud
DEFECTS = {"capsule": [("0", 1, 1, 0), ("1", 0, 1, 1), ("2", 1, 0, 0)],
           "cotton": [("0", 1, 0, 0), ("1", 0, 0, 1), ("2", 1, 0, 1)]}


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _texture(rng: np.random.Generator, grey: bool) -> np.ndarray:
    base = rng.integers(90, 140, (SIZE, SIZE, 1 if grey else 3), dtype=np.uint8)
    return base[..., 0] if grey else base


def make_mulsen(root: Path, csv_keys: str = "names", num_train: int = 6, seed: int = 0) -> Path:
    """The published tree (ZZZBBBZZZ/MulSen-AD README): <class>/{RGB,Infrared,Pointcloud}/{train,test,GT};
    a defect's labels in RGB/GT/<defect>/data.csv, rows written in reverse order with the object's file
    name (csv_keys "names") or with a column naming no file (csv_keys "other": read by position)."""
    rng = np.random.default_rng(seed)
    for cls, defects in DEFECTS.items():
        for modality, grey in (("RGB", False), ("Infrared", True)):
            for i in range(num_train):
                _save(root / cls / modality / "train" / f"{i}.png", _texture(rng, grey))
            for i in range(3):
                _save(root / cls / modality / "test" / "good" / f"{i}.png", _texture(rng, grey))
            for name, *labels in defects:
                image, mask = _texture(rng, grey), np.zeros((SIZE, SIZE), np.uint8)
                if labels[0 if modality == "RGB" else 1]:
                    row = 8 + 10 * int(name)  # where the defect sits tells which object a mask belongs to
                    image[row:row + 8, 10:20] = 250
                    mask[row:row + 8, 10:20] = 255
                    _save(root / cls / modality / "GT" / "crack" / f"{name}.png", mask)
                _save(root / cls / modality / "test" / "crack" / f"{name}.png", image)
        for part in ("train", "test/good", "test/crack"):  # point clouds: in the tree, never read
            folder = root / cls / "Pointcloud" / part
            folder.mkdir(parents=True, exist_ok=True)
            for png in (root / cls / "RGB" / part).glob("*.png"):
                (folder / f"{png.stem}.stl").write_text("solid empty\nendsolid empty\n")
        rows = list(reversed(defects)) if csv_keys == "names" else defects
        with open(root / cls / "RGB" / "GT" / "crack" / "data.csv", "w", newline="") as f:
            csv.writer(f).writerows([["object", "rgb", "infrared", "pointcloud"]]
                                    + [[name if csv_keys == "names" else cls, *labels] for name, *labels in rows])
    return root


@pytest.fixture(scope="module")
def mulsen_root(tmp_path_factory) -> Path:
    return make_mulsen(tmp_path_factory.mktemp("mulsen"))


def _cfg(root: Path, **extra) -> dict:
    return {**DEFAULTS, "dataset": "mulsen", "data_path": str(root), "image_size": 64, "crop_size": 56, **extra}


@pytest.mark.parametrize("csv_keys", ["names", "other"])
def test_loader_pairs_by_name_and_reads_labels(tmp_path, csv_keys):
    root = make_mulsen(tmp_path, csv_keys)
    samples = build_test_set(_cfg(root), "capsule").samples
    assert len(samples) == 2 * (3 + 3)
    for rgb, infrared in zip(samples[0::2], samples[1::2]):
        assert (rgb.modality, infrared.modality) == ("RGB", "Infrared")
        assert rgb.image.name == infrared.image.name and rgb.object_id == infrared.object_id
        assert rgb.image.parts[-4:-3] == ("RGB",) and infrared.image.parts[-4:-3] == ("Infrared",)
    by_object = {s.object_id: s for s in samples if s.modality == "Infrared"}
    for name, rgb, infrared, pointcloud in DEFECTS["capsule"]:
        sample = by_object[f"crack/{name}.png"]
        assert sample.label == infrared and sample.object_label == max(rgb, infrared, pointcloud)
        assert (sample.mask is not None) == bool(infrared)
        if infrared:
            assert sample.mask == root / "capsule" / "Infrared" / "GT" / "crack" / f"{name}.png"
    assert all(s.label == 0 and s.object_label == 0 and s.mask is None for s in samples if s.defect == "good")


def test_unpaired_image_and_bad_csv_are_one_line_errors(tmp_path):
    root = make_mulsen(tmp_path)
    (root / "capsule" / "Infrared" / "train" / "5.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"RGB/train/5\.png has no partner"):
        build_train_set(_cfg(root), ["capsule"])
    csv_path = root / "cotton" / "RGB" / "GT" / "crack" / "data.csv"
    csv_path.write_text(csv_path.read_text() + "3,1,0\n")
    with pytest.raises(DatasetLayoutError, match="data.csv line 5"):
        build_test_set(_cfg(root), "cotton")


def test_batches_are_half_rgb_half_infrared_of_the_same_objects(mulsen_root):
    train_set = build_train_set(_cfg(mulsen_root), ["capsule", "cotton"])
    paths = [path for path, _ in train_set.samples]
    n = len(paths) // 2
    assert all(p.parts[-3] == "RGB" for p in paths[:n]) and all(p.parts[-3] == "Infrared" for p in paths[n:])
    sampler = lambda start: list(StepBatchSampler(len(paths), 8, 9, seed=3, start_step=start, modalities=2))
    batches = sampler(0)
    for batch in batches:
        rgb, infrared = [paths[i] for i in batch[:4]], [paths[i] for i in batch[4:]]
        assert all(p.parts[-3] == "RGB" for p in rgb) and all(p.parts[-3] == "Infrared" for p in infrared)
        assert [(p.parts[-4], p.name) for p in rgb] == [(p.parts[-4], p.name) for p in infrared]
    epoch = sorted(i for batch in batches[:3] for i in batch[:4])  # 12 objects, 4 per step: each once
    assert epoch == list(range(n))
    assert sampler(5) == batches[5:]  # a resumed run draws the same batches
    ranks = [list(StepBatchSampler(len(paths), 8, 9, seed=3, rank=r, world_size=2, modalities=2)) for r in (0, 1)]
    for batch, first, second in zip(batches, *ranks):  # each process: its objects' RGB, then their infrared
        assert first[:2] + second[:2] == batch[:4] and first[2:] + second[2:] == batch[4:]


def _outputs(samples, seed=0) -> ClassOutputs:
    """Random maps where the masks are those of `samples`' labels: a box for every anomalous image."""
    generator = torch.Generator().manual_seed(seed)
    count = len(samples)
    maps = torch.rand(count, 16, 16, generator=generator)
    masks = torch.zeros(count, 16, 16, dtype=torch.bool)
    for i, sample in enumerate(samples):
        if sample.label:
            masks[i, 2 + i % 8:6 + i % 8, 3:9] = True
            maps[i] += 0.5 * masks[i]
    scores = torch.rand(count, generator=generator) + 0.3 * torch.tensor([s.label for s in samples])
    return ClassOutputs(maps, scores, torch.tensor([s.label for s in samples]), masks, 0.0)


def test_metrics_against_a_direct_computation(mulsen_root):
    cfg = _cfg(mulsen_root)
    dataset = build_test_set(cfg, "cotton")
    outputs = _outputs(dataset.samples)
    row = metrics_row(outputs, cfg, dataset)
    rgb = np.array([s.modality == "RGB" for s in dataset.samples])
    scores, labels = outputs.scores.numpy(), outputs.labels.numpy()
    object_scores = scores[rgb] + scores[~rgb]  # samples alternate RGB, infrared per object
    object_labels = [s.object_label for s in np.array(dataset.samples)[rgb]]
    assert row["O-AUROC"] == pytest.approx(roc_auc_score(object_labels, object_scores))
    assert row["O-AP"] == pytest.approx(average_precision_score(object_labels, object_scores))
    maps, masks = outputs.maps.numpy()[rgb], outputs.masks.numpy()[rgb]
    assert row["RGB P-AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert row["RGB AUPRO"] == pytest.approx(direct_aupro(maps, masks), abs=1e-6)
    assert row["I-AUROC"] == pytest.approx(roc_auc_score(labels, scores))
    assert all(row[f"IR {m}"] is None for m in ("P-AUROC", "P-AP", "P-F1max", "AUPRO"))
    assert "no anomalous Infrared pixel" in row["empty"]


def test_tiny_run_writes_modality_and_object_metrics(mulsen_root, tiny_weights, tmp_path, capsys):
    args = tiny_run_args(mulsen_root, tiny_weights, tmp_path, dataset="mulsen", image_size=64, crop_size=56,
                         total_iters=2, warmup_iters=1, map_size=56, gt_threshold=0.5)
    result = run_in_process(train_uni, args + ["--classes", "[capsule, cotton]"], capsys)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {r["class"]: r for r in read_rows(tmp_path / "run" / "results.csv")}
    for column in ("O-AUROC", "O-AP", "O-F1max", "RGB P-AUROC", "RGB AUPRO", "IR P-AUROC", "IR AUPRO"):
        assert 0 <= float(rows["capsule"][column]) <= 100
    assert all(rows["cotton"][f"IR {m}"] == "" for m in ("P-AUROC", "P-AP", "P-F1max", "AUPRO"))
    assert rows["mean"]["IR P-AUROC"] == rows["capsule"]["IR P-AUROC"]  # the classes that have a value
    assert "cotton: IR P-*, AUPRO: no anomalous Infrared pixel" in (tmp_path / "run" / "results.md").read_text()
