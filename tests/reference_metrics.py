"""Slow, direct implementations of the metric definitions (RECIPE.md section 5): the test oracle.

This mirrors the reference code's AUPRO: a Python loop over thresholds, images and scikit-image
regions. It is also what benchmarks/aupro_speed.py times the fast version against.
"""
import numpy as np
from skimage import measure
from sklearn.metrics import auc, precision_recall_curve


def direct_aupro(maps: np.ndarray, masks: np.ndarray, num_thresholds: int = 200, fpr_limit: float = 0.3) -> float:
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    lo, hi = float(maps.min()), float(maps.max())
    step = (hi - lo) / num_thresholds
    normal = ~masks
    fprs, pros = [], []
    for k in range(num_thresholds):
        binary = maps > lo + k * step
        overlaps = [binary[i][r.coords[:, 0], r.coords[:, 1]].sum() / r.area
                    for i in range(len(maps)) for r in measure.regionprops(measure.label(masks[i], connectivity=2))]
        fprs.append(np.logical_and(normal, binary).sum() / normal.sum())
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    return auc(fprs / fprs.max(), pros)


def direct_f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float((2 * precision * recall / (precision + recall + 1e-7))[:-1].max())
