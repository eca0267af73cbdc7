"""Results of a class whose test images are several modalities of each object (MulSen-AD: RGB, infrared).

One row per class, as the released script reports it (utils.py evaluation_batch_rgbinfra):
- O-AUROC, O-AP, O-F1max: object score = the sum of its RGB and infrared image scores, object label = the
  any-modality label of the dataset, which counts the point cloud too although it is never scored;
- RGB P-AUROC ... AUPRO and IR P-AUROC ... AUPRO: the pixel metrics of each modality's images;
- I-AUROC ... AUPRO and mAD (not in the released code): every RGB and infrared image scored as an image
  against its own modality's label, the pixel metrics over both modalities' images together.
A metric that its images cannot define (a class without an anomalous infrared pixel: the released AUPRO
asserts, scikit-learn's AUROC raises) is None, an empty cell, and the row's EMPTY entry says why.
"""
import torch

from .metrics import aupro, mean_anomaly_detection, ranking_metrics

MODALITY_SHORT = {"RGB": "RGB", "Infrared": "IR"}
PIXEL_NAMES = ("P-AUROC", "P-AP", "P-F1max", "AUPRO")
MODALITY_COLUMNS = tuple(f"{short} {name}" for short in MODALITY_SHORT.values() for name in PIXEL_NAMES)
EMPTY = "empty"  # a row's key: why some of its cells are empty


def has_both(labels: torch.Tensor) -> bool:
    """Ranking metrics need positives and negatives."""
    return bool(labels.any()) and not bool(labels.all())


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor, cfg: dict) -> dict[str, float]:
    pixel = ranking_metrics(maps, masks)
    return {"P-AUROC": pixel["auroc"], "P-AP": pixel["ap"], "P-F1max": pixel["f1max"],
            "AUPRO": aupro(maps, masks, cfg["aupro_thresholds"], cfg["aupro_fpr_limit"])}


def objects_of(samples: list) -> list[list[int]]:
    """The indices of each object's samples (those sharing an object_id), objects in order of appearance."""
    members: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        members.setdefault(sample.object_id, []).append(index)
    return list(members.values())


def object_sums(scores: torch.Tensor, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object: the sum of its images' scores and its object_label."""
    objects = objects_of(samples)
    return (torch.stack([scores[indices].sum() for indices in objects]),
            torch.tensor([samples[indices[0]].object_label for indices in objects]))


def modality_row(outputs, samples: list, cfg: dict) -> dict:
    """The row described in the module docstring, from one class's ClassOutputs and its TestSamples."""
    empty, row = [], {}
    labels = outputs.labels.bool()
    if has_both(labels):
        image = ranking_metrics(outputs.scores, labels)
        row.update({"I-AUROC": image["auroc"], "I-AP": image["ap"], "I-F1max": image["f1max"],
                    "image_threshold": image["f1_threshold"]})
    else:
        row.update(dict.fromkeys(("I-AUROC", "I-AP", "I-F1max", "image_threshold")))
        empty.append(f"I-*, mAD: every RGB and infrared image is {'anomalous' if labels.all() else 'normal'}")
    if outputs.masks.any():
        row.update(pixel_metrics(outputs.maps, outputs.masks, cfg))
    else:
        row.update(dict.fromkeys(PIXEL_NAMES))
        empty.append("P-*, AUPRO, mAD: no anomalous pixel in any image")
    row["mAD"] = mean_anomaly_detection(row)  # None where one of the seven is
    objects = ranking_metrics(*object_sums(outputs.scores, samples))
    row.update({"O-AUROC": objects["auroc"], "O-AP": objects["ap"], "O-F1max": objects["f1max"]})
    for modality, short in MODALITY_SHORT.items():
        chosen = torch.tensor([s.modality == modality for s in samples], device=outputs.maps.device)
        if outputs.masks[chosen].any():
            metrics = pixel_metrics(outputs.maps[chosen], outputs.masks[chosen], cfg)
        else:
            metrics = dict.fromkeys(PIXEL_NAMES)
            empty.append(f"{short} P-*, AUPRO: no anomalous {modality} pixel in this class's test set")
        row.update({f"{short} {name}": value for name, value in metrics.items()})
    row[EMPTY] = "; ".join(empty)
    return row
