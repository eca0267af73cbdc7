"""Evaluation shared by training, evaluate.py and predict.py.

Classes are evaluated one at a time, so memory is bounded by the largest class, not the dataset.
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import yaml
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datasets import TestSet
from .anomaly_map import anomaly_maps, image_scores
from .device import autocast
from .metrics import (METRIC_NAMES, PIXEL_METRICS, class_metrics, image_metrics, mean_anomaly_detection,
                      ranking_metrics)
from .modality_metrics import EMPTY, MODALITY_COLUMNS, has_both, modality_row, objects_of

TABLE_COLUMNS = METRIC_NAMES + ("mAD",)
OBJECT_COLUMNS = ("O-AUROC", "O-AP", "O-F1max")  # multi-view sets (Dinomaly2): one score per object
NO_MASKS_NOTE = ("Pixel metrics, AUPRO and mAD are empty: this run has image labels only (masks: none), so nothing "
                 "can be scored per pixel; mAD, the mean of all seven metrics, is not replaced by a mean of the "
                 "three image metrics, which would not compare with any other run's mAD.")


@dataclass
class ClassOutputs:
    maps: torch.Tensor      # N x S x S float32 anomaly maps
    scores: torch.Tensor    # N image scores
    labels: torch.Tensor    # N, 1 = anomalous
    masks: Optional[torch.Tensor]  # N x S x S bool ground truth; None with masks: none (image labels only)
    seconds: float          # time spent in the model and map computation


@torch.no_grad()
def predict_maps(model: torch.nn.Module, images: torch.Tensor, cfg: dict,
                 precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (B x S x S) and image scores (B) of a batch already on the model's device. A model
    that makes its own maps (ADViT, models/advit.py) gives them through `anomaly_map(images, size)`.
    With `precision` bf16 or fp16 (predict.py --precision) encoder and decoder run under autocast; the
    maps, their smoothing and the scores are computed in fp32 from the features either way."""
    if hasattr(model, "anomaly_map"):
        maps = model.anomaly_map(images, cfg["map_size"])[:, None]
    else:
        with autocast(images.device, precision):
            en, de = model(images)
        maps = anomaly_maps(en, de, images.shape[-1], cfg["map_size"], cfg["map_sigma"])
    return maps[:, 0], image_scores(maps, cfg["max_ratio"])


def binarise_masks(masks: torch.Tensor, size: int, threshold: float) -> torch.Tensor:
    """Nearest-resize B x 1 x H x W masks to size x size and binarise with gt > threshold."""
    return F.interpolate(masks, size=size, mode="nearest")[:, 0] > threshold


@torch.no_grad()
def infer_class(model: torch.nn.Module, dataset: TestSet, cfg: dict, device: torch.device,
                batch_size: Optional[int] = None, precision: str = "fp32") -> ClassOutputs:
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size or cfg["batch_size"], shuffle=False,
                        num_workers=cfg["num_workers"], pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # leaves the global RNG (dropout) untouched
    maps, scores, labels, masks, seconds = [], [], [], [], 0.0
    for images, gt, label, _ in loader:
        start = time.perf_counter()
        batch_maps, batch_scores = predict_maps(model, images.to(device, non_blocking=True), cfg, precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        maps.append(batch_maps)
        scores.append(batch_scores)
        labels.append(label)
        masks.append(binarise_masks(gt, cfg["map_size"], cfg["gt_threshold"]).to(device))
    return ClassOutputs(torch.cat(maps), torch.cat(scores), torch.cat(labels).to(device),
                        torch.cat(masks) if cfg["masks"] == "required" else None, seconds)


def object_scores(outputs: ClassOutputs, dataset: TestSet, max_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object (the samples sharing an object_id): the mean of the top `max_ratio` share of the pixels
    of all its views' maps pooled (not a mean or max of the view scores), and its label, anomalous when
    any of its views is (Dinomaly2's object-level protocol)."""
    views = objects_of(dataset.samples)
    scores = [image_scores(outputs.maps[indices].reshape(1, -1), max_ratio)[0] for indices in views]
    labels = [outputs.labels[indices].max() for indices in views]
    return torch.stack(scores), torch.stack(labels)


def metrics_row(outputs: ClassOutputs, cfg: dict, dataset: Optional[TestSet] = None) -> dict[str, Optional[float]]:
    """The seven metrics (and mAD) of one class, the pixel ones None without masks; with a multi-view
    `dataset` (samples carrying an object_id) the object-level O-AUROC, O-AP and O-F1max too; with a
    multi-modal one (samples carrying a modality: MulSen-AD) the row of utils/modality_metrics.py. The score
    scale predict.py --normalize reads is stored beside them: image and map range and F1-max thresholds
    (without masks the pixel threshold is the image one, as anomalib does: the image score is a mean of
    map values, on the map's scale)."""
    if dataset is not None and dataset.samples[0].modality is not None:
        row = modality_row(outputs, dataset.samples, cfg)
    elif outputs.masks is None:
        row = {**image_metrics(outputs.scores, outputs.labels), **dict.fromkeys(PIXEL_METRICS)}
        row["pixel_threshold"] = row["image_threshold"]
        row["mAD"] = mean_anomaly_detection(row)
    else:
        row = class_metrics(outputs.scores, outputs.labels, outputs.maps, outputs.masks,
                            cfg["aupro_thresholds"], cfg["aupro_fpr_limit"])
        row["mAD"] = mean_anomaly_detection(row)
        if dataset is not None and dataset.samples[0].object_id is not None:
            objects = ranking_metrics(*object_scores(outputs, dataset, cfg["max_ratio"]))
            row.update({"O-AUROC": objects["auroc"], "O-AP": objects["ap"], "O-F1max": objects["f1max"]})
    row["map_min"], row["map_max"] = float(outputs.maps.min()), float(outputs.maps.max())  # heatmap colour scale
    row["score_min"], row["score_max"] = float(outputs.scores.min()), float(outputs.scores.max())
    return row


SCALE_KEYS = {"image": ("score_min", "image_threshold", "score_max"),  # the row keys of the --normalize scale
              "pixel": ("map_min", "pixel_threshold", "map_max")}


def normalization_scales(rows: dict[str, dict]) -> dict[str, dict[str, list[float]]]:
    """Per class, the (min, F1-max threshold, max) of the image scores and of the map values at the last
    evaluation: what --normalize maps to 0, 0.5 and 1. Classes of older checkpoints, which stored no
    score range, are left out."""
    return {name: {part: [row[key] for key in keys] for part, keys in SCALE_KEYS.items()}
            for name, row in rows.items() if all(key in row for keys in SCALE_KEYS.values() for key in keys)}


def defect_rows(outputs: ClassOutputs, dataset: TestSet) -> list[dict]:
    """Image and pixel AUROC of each defect type against the normal images of its class (None where
    that defect's images have no anomalous label or pixel: MulSen-AD, a defect seen in one modality)."""
    defects = np.array([s.defect for s in dataset.samples])
    good = torch.from_numpy(defects == "good").to(outputs.labels.device)
    rows = []
    for defect in sorted({s.defect for s in dataset.samples} - {"good"}):
        keep = good | torch.from_numpy(defects == defect).to(good.device)
        rows.append({
            "class": dataset.samples[0].class_name, "defect": defect, "images": int(keep.sum() - good.sum()),
            "I-AUROC": _auroc_or_none(outputs.scores[keep], outputs.labels[keep]),
            "P-AUROC": None if outputs.masks is None else _auroc_or_none(outputs.maps[keep], outputs.masks[keep]),
        })
    return rows


def _auroc_or_none(scores: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
    return ranking_metrics(scores, labels)["auroc"] if has_both(labels.bool()) else None


@dataclass
class EvaluationResult:
    rows: dict[str, dict[str, float]]     # class -> metrics (fractions) + image_threshold
    defects: list[dict]
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


def evaluate(model: torch.nn.Module, test_sets: dict[str, TestSet], cfg: dict, device: torch.device,
             log: Callable[[str], None] = print,
             on_class: Optional[Callable[[str, TestSet, ClassOutputs], None]] = None,
             precision: str = "fp32") -> EvaluationResult:
    """Evaluate class by class; only one class's maps are held at a time (`on_class` sees them). Training
    evaluates in fp32 whatever its own precision; evaluate.py --precision measures what bf16 scoring moves."""
    rows, defects, images, seconds = {}, [], 0, 0.0
    for name, dataset in test_sets.items():
        outputs = infer_class(model, dataset, cfg, device, precision=precision)
        rows[name] = metrics_row(outputs, cfg, dataset)
        if on_class is not None:
            on_class(name, dataset, outputs)
        defects += defect_rows(outputs, dataset)
        images += len(dataset)
        seconds += outputs.seconds
        log(f"  {name:<14}" + " ".join(f"{k} {percent(rows[name][k]) or '-':>6}" for k in table_columns(rows)))
        del outputs
    return EvaluationResult(rows, defects, images, seconds)


def table_columns(rows: dict[str, dict[str, float]]) -> tuple[str, ...]:
    """The seven metrics and mAD, then the object-level and per-modality ones where every class has them."""
    extra = [c for c in (OBJECT_COLUMNS + MODALITY_COLUMNS) if rows and all(c in row for row in rows.values())]
    return TABLE_COLUMNS + tuple(extra)


def mean_or_none(values: list[Optional[float]]) -> Optional[float]:
    """The mean of the values that exist (the classes that have the metric), None when none does."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def mean_row(rows: dict[str, dict[str, Optional[float]]]) -> dict[str, Optional[float]]:
    return {k: mean_or_none([row[k] for row in rows.values()]) for k in table_columns(rows)}


def percent(value: Optional[float], digits: int = 2) -> str:
    """A fraction as a percentage; an empty cell for a metric not computed (None)."""
    return "" if value is None else f"{100 * value:.{digits}f}"


def format_markdown(rows: dict[str, dict[str, Optional[float]]]) -> str:
    """The per-class table with its mean row, and a note when the pixel columns are empty."""
    columns = table_columns(rows)
    lines = ["| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in list(rows.items()) + [("mean", mean_row(rows))]:
        lines.append(f"| {name} | " + " | ".join(percent(row[k]) for k in columns) + " |")
    if any(row["P-AUROC"] is None and not row.get(EMPTY) for row in rows.values()):
        lines += ["", NO_MASKS_NOTE]
    return "\n".join(lines + empty_notes(rows)) + "\n"


def empty_notes(rows: dict[str, dict]) -> list[str]:
    """Why cells are empty, one line per class that has some (MulSen-AD), and how the mean row treats them."""
    notes = [f"- {name}: {row[EMPTY]}" for name, row in rows.items() if row.get(EMPTY)]
    if notes:
        notes = ["", "Empty cells (never 0): a metric its test images cannot define. The mean row averages the "
                 "classes that have a value.", ""] + notes
    return notes


PAPER_PER_CLASS = Path(__file__).resolve().parents[1] / "configs" / "paper_per_class.yaml"


def paper_per_class(dataset: str) -> Optional[dict[str, list[float]]]:
    """The paper's per-class numbers of a main-table dataset (multi-class setting), else None."""
    return yaml.safe_load(PAPER_PER_CLASS.read_text()).get(dataset)


def format_paper_comparison(rows: dict[str, dict[str, float]], paper: dict[str, list[float]]) -> str:
    """ours / paper / difference per class and metric, for the classes the paper reports."""
    names = [n for n in rows if n in paper]
    if not names:
        return ""
    ours = {n: [None if rows[n][k] is None else 100 * rows[n][k] for k in METRIC_NAMES] for n in names}
    ours["mean"] = [mean_or_none([ours[n][i] for n in names]) for i in range(len(METRIC_NAMES))]
    theirs = {**{n: paper[n] for n in names},
              "mean": [float(np.mean([paper[n][i] for n in names])) for i in range(len(METRIC_NAMES))]}
    lines = ["", "## Beside the paper (Tables A8-A13, multi-class): ours / paper / difference", "",
             "| class | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    for name in names + ["mean"]:
        lines.append(f"| {name} | " + " | ".join(f"/ {p:.1f} /" if o is None else f"{o:.2f} / {p:.1f} / {o - p:+.2f}"
                                                 for o, p in zip(ours[name], theirs[name])) + " |")
    return "\n".join(lines) + "\n"


def write_tables(run_dir: Path, result: EvaluationResult, stem: str = "results",
                 paper: Optional[dict[str, list[float]]] = None) -> None:
    """Per-class table (classes + mean, in percent) as CSV and Markdown, and the per-defect breakdown;
    with `paper` (a main-table run), results.md also shows the paper's per-class numbers beside ours."""
    run_dir = Path(run_dir)
    rows = result.rows
    columns = table_columns(rows)
    csv = ["class," + ",".join(columns)]
    for name, row in list(rows.items()) + [("mean", mean_row(rows))]:
        csv.append(name + "," + ",".join(percent(row[k], 4) for k in columns))
    (run_dir / f"{stem}.csv").write_text("\n".join(csv) + "\n")
    (run_dir / f"{stem}.md").write_text(format_markdown(rows) + (format_paper_comparison(rows, paper) if paper else ""))
    defect_csv = ["class,defect,images,I-AUROC,P-AUROC"] + [
        f"{d['class']},{d['defect']},{d['images']},{percent(d['I-AUROC'], 4)},{percent(d['P-AUROC'], 4)}"
        for d in result.defects]
    (run_dir / f"{stem}_per_defect.csv").write_text("\n".join(defect_csv) + "\n")
