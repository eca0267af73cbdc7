import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from reference_metrics import direct_aupro, direct_f1max
from utils.anomaly_map import anomaly_maps, gaussian_kernel, image_scores
from utils.metrics import aupro, class_metrics, ranking_metrics


@pytest.mark.parametrize("n,levels,seed", [(40, None, 0), (5000, None, 1), (3000, 7, 2), (200, 2, 3)])
def test_ranking_metrics_match_sklearn(n, levels, seed):
    """Continuous scores and heavily tied ones (levels = number of distinct values)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + labels * 0.8
    if levels:
        scores = np.round(scores * levels / 4) / levels
    scores = scores.astype(np.float32)
    got = ranking_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["f1max"] == pytest.approx(direct_f1max(labels, scores), abs=1e-12)


def test_f1_threshold_reaches_f1max():
    rng = np.random.default_rng(4)
    labels = rng.random(300) < 0.4
    scores = (rng.normal(size=300) + labels).astype(np.float32)
    got = ranking_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    predicted = scores >= got["f1_threshold"]
    tp = (predicted & labels).sum()
    precision, recall = tp / predicted.sum(), tp / labels.sum()
    assert 2 * precision * recall / (precision + recall + 1e-7) == pytest.approx(got["f1max"], abs=1e-12)


def test_ranking_metrics_need_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        ranking_metrics(torch.rand(10), torch.zeros(10, dtype=torch.bool))


def _structured(seed: int, n: int = 8, size: int = 48):
    """Masks with several regions each (some touching only diagonally), empty masks, and ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 10, size=2)
            h, w = rng.integers(1, 10, size=2)
            masks[i, y:y + h, x:x + w] = True
    masks[1, 5, 5] = masks[1, 6, 6] = True  # diagonal neighbours: one region under 8-connectivity
    maps = rng.random((n, size, size)).astype(np.float32) + masks * rng.uniform(0, 0.8)
    return np.round(maps, 2), masks  # rounding creates ties with the thresholds' neighbourhood


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_direct_definition(seed):
    maps, masks = _structured(seed)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(direct_aupro(maps, masks), abs=1e-9)


def test_aupro_random_and_options():
    rng = np.random.default_rng(5)
    maps = rng.random((4, 32, 32)).astype(np.float32)
    masks = rng.random((4, 32, 32)) < 0.1
    for thresholds, limit in ((200, 0.3), (50, 0.5), (300, 0.1)):
        expected = direct_aupro(maps, masks, thresholds, limit)
        assert aupro(torch.from_numpy(maps), torch.from_numpy(masks), thresholds, limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_thresholds_exactly_on_pixel_values():
    """Maps whose values sit exactly on thresholds test the strict '> th' comparison."""
    maps = np.tile(np.arange(0, 201, dtype=np.float32)[None, :, None], (3, 1, 4)) / 200
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 150:] = True
    masks[2, 100:120, :2] = True
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(direct_aupro(maps, masks), abs=1e-9)


def test_class_metrics_matches_sklearn_and_direct_aupro():
    maps, masks = _structured(7)
    labels = masks.reshape(len(masks), -1).any(1)
    scores = maps.reshape(len(maps), -1).max(1)
    row = class_metrics(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(maps),
                        torch.from_numpy(masks))
    assert row["I-AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert row["I-AP"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert row["P-AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert row["P-AP"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert row["P-F1max"] == pytest.approx(direct_f1max(masks.ravel(), maps.ravel()), abs=1e-12)
    assert row["AUPRO"] == pytest.approx(direct_aupro(maps, masks), abs=1e-9)


def test_gaussian_kernel_and_anomaly_map_definition():
    kernel = gaussian_kernel(5, 4.0)[0, 0].double()
    coords = torch.arange(5, dtype=torch.float64) - 2
    direct = torch.exp(-(coords[None] ** 2 + coords[:, None] ** 2) / 32)
    torch.testing.assert_close(kernel, direct / direct.sum())
    g = torch.Generator().manual_seed(0)
    en = [torch.randn(2, 6, 4, 4, generator=g) for _ in range(2)]
    de = [torch.randn(2, 6, 4, 4, generator=g) for _ in range(2)]
    got = anomaly_maps(en, de, input_size=56, out_size=32)
    per_group = [torch.nn.functional.interpolate(1 - torch.nn.functional.cosine_similarity(e, d).unsqueeze(1),
                                                 size=56, mode="bilinear", align_corners=True) for e, d in zip(en, de)]
    mean = torch.nn.functional.interpolate((per_group[0] + per_group[1]) / 2, size=32, mode="bilinear")
    padded = torch.nn.functional.pad(mean, (2, 2, 2, 2))
    expected = torch.zeros_like(mean)
    for dy in range(5):
        for dx in range(5):
            expected += kernel[dy, dx].float() * padded[..., dy:dy + 32, dx:dx + 32]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_image_score_is_mean_of_top_one_percent():
    maps = torch.rand(3, 1, 256, 256)
    k = int(256 * 256 * 0.01)
    expected = torch.stack([torch.sort(m.flatten(), descending=True).values[:k].mean() for m in maps])
    torch.testing.assert_close(image_scores(maps, 0.01), expected)
    torch.testing.assert_close(image_scores(maps, 0.0), maps.flatten(1).max(1).values)
