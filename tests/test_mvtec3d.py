"""MVTec 3D-AD and the RGB-D setting: the preparation of organized point clouds, the depth rendering, the
RGB/depth blend of the encoder layers, and a miniature whose defects exist only in depth."""
import csv

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import evaluate
import export
import predict
import train_uni
from conftest import ROOT, encoder_layers, run_in_process, tiny_run_args
from sklearn.metrics import roc_auc_score
from datasets import build_train_set
from datasets.caches import FeatureCache
from datasets.mvtec3d import RGBDReader, render_depth
from models import build_model
from prepare_data import prepare_mvtec3d
from prepare_data.make_synthetic import make_rgbd_dataset
from utils.config import load_config, validate

H, W = 50, 70              # padded to 100 x 100: 25 rows above and below, 15 columns left and right
SPACING = 0.001            # 1 mm between neighbouring points: DBSCAN's eps (6 mm) links them


def scene(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xyz, rgb, object mask): a tilted plane, a dome standing 8+ mm off it with missing points inside,
    a 6 x 6 patch (a cluster of 36, smaller than the dome) and three 2 x 2 specks (noise) floating above it."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:H, :W].astype(np.float64)
    x, y = (cols - W / 2 + 0.5) * SPACING, (rows - H / 2 + 0.5) * SPACING  # no coordinate exactly 0
    z = 0.7 + 0.05 * x + 0.03 * y
    dome = np.hypot(rows - 25, cols - 30) < 12
    z = np.where(dome, z - 0.008 - 0.02 * np.sqrt(np.clip(1 - np.hypot(rows - 25, cols - 30) ** 2 / 144, 0, 1)), z)
    patch = (rows >= 20) & (rows < 26) & (cols >= 55) & (cols < 61)
    specks = np.zeros((H, W), bool)
    for r, c in ((5, 15), (44, 50), (12, 48)):
        specks[r:r + 2, c:c + 2] = True
    z = np.where(patch | specks, z - 0.03, z)
    xyz = np.stack([x, y, z], -1).astype(np.float32)
    holes = dome & (rng.random((H, W)) < 0.05)
    xyz[holes] = 0
    xyz[:3, :4] = 0                                   # missing points in the border frame
    rgb = rng.integers(1, 256, (H, W, 3), dtype=np.uint8)
    return xyz, rgb, dome & ~holes


def write_raw(root, seed: int = 0) -> dict:
    """One normal training sample and one defective test sample in MVTec 3D-AD's own layout."""
    truth = {}
    for split, defect in (("train", "good"), ("test", "crack")):
        xyz, rgb, keep = scene(seed + len(truth))
        folder = root / "dome" / split / defect
        for sub in ("xyz", "rgb", "gt"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / "xyz" / "000.tiff", xyz, photometric="rgb")
        Image.fromarray(rgb).save(folder / "rgb" / "000.png")
        gt = np.zeros((H, W), np.uint8)
        gt[22:28, 28:33] = 255
        if defect != "good":
            Image.fromarray(gt).save(folder / "gt" / "000.png")
        truth[f"{split}/{defect}"] = (xyz, rgb, keep, gt if defect != "good" else None)
    return truth


def released_fill(z: np.ndarray) -> np.ndarray:
    """The released fill_gaps, pixel by pixel: a zero gets sum(3 x 3 window) / #(window > 0), the window a
    Python slice starting at p - 1 (empty for row or column 0), reading the previous pass."""
    out = z.copy()
    for r, c in zip(*np.where(z == 0)):
        window = z[r - 1: r + 2, c - 1: c + 2]
        count = np.sum(window > 0)
        if count:
            out[r, c] = np.sum(window, axis=(0, 1)) / count
    return out


def pad(array: np.ndarray) -> np.ndarray:
    return np.pad(array, [(25, 25), (15, 15)] + [(0, 0)] * (array.ndim - 2))


def test_prepare_removes_plane_keeps_largest_cluster_fills_holes(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    truth = write_raw(raw)
    result = run_in_process(prepare_mvtec3d, ["--data_path", raw, "--out", out], capsys)
    assert result.returncode == 0, result.stderr
    for key, (xyz, rgb, keep, gt) in truth.items():
        folder = out / "dome" / key
        expected_xyz = pad(np.where(keep[..., None], xyz, 0))
        assert np.array_equal(tifffile.imread(folder / "xyz" / "000.tiff"), expected_xyz)
        missing = np.all(xyz == 0, axis=-1)  # as released, a point without coordinates keeps its colour
        assert np.array_equal(np.array(Image.open(folder / "rgb" / "000.png")),
                              pad(np.where((keep | missing)[..., None], rgb, 0)))
        z = expected_xyz[..., 2]
        for _ in range(3):
            z = released_fill(z)
        assert np.array_equal(np.array(Image.open(folder / "z" / "000.tiff")), z)
        assert (z[0] == 0).all() and (z[:, 0] == 0).all()      # row and column 0 are never filled
        if gt is not None:
            assert np.array_equal(np.array(Image.open(folder / "gt" / "000.png")), pad(gt))
    assert list((raw / "dome" / "train" / "good").iterdir()) and not (raw / "dome" / "train" / "good" / "z").exists()

    files = sorted(p for p in out.rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    again = run_in_process(prepare_mvtec3d, ["--data_path", raw, "--out", out], capsys)
    assert "0 samples prepared, 2 already there" in again.stdout
    assert [p.stat().st_mtime_ns for p in files] == stamps
    second = tmp_path / "second"
    assert run_in_process(prepare_mvtec3d, ["--data_path", raw, "--out", second], capsys).returncode == 0
    assert [p.relative_to(second) for p in sorted(second.rglob("*")) if p.is_file()] == [p.relative_to(out) for p in files]
    assert all((second / p.relative_to(out)).read_bytes() == p.read_bytes() for p in files)


def test_prepare_refuses_a_file_that_is_not_an_organized_point_cloud(tmp_path, capsys):
    folder = tmp_path / "raw" / "dome" / "train" / "good"
    (folder / "xyz").mkdir(parents=True)
    tifffile.imwrite(folder / "xyz" / "000.tiff", np.ones((20, 20), np.float32))
    result = run_in_process(prepare_mvtec3d, ["--data_path", tmp_path / "raw", "--out", tmp_path / "out"], capsys)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "000.tiff is not an organized point cloud" in errors[0]
    inside = run_in_process(prepare_mvtec3d, ["--data_path", tmp_path / "raw", "--out", tmp_path / "raw" / "p"], capsys)
    assert inside.returncode == 1 and "never writes in place" in inside.stderr


def test_depth_rendering_and_rgb_masking_match_a_direct_computation(tmp_path):
    rng = np.random.default_rng(3)
    z = rng.uniform(0.55, 0.75, (24, 32)).astype(np.float32)
    z[rng.random(z.shape) < 0.3] = 0
    rendering, foreground = render_depth(z, tmp_path / "z.tiff")
    hot = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_HOT)[0, :, ::-1]  # RGB per level
    low, high = min(float(v) for v in z.ravel() if v > 0), float(z.max())
    for r in range(z.shape[0]):
        for c in range(z.shape[1]):
            if z[r, c] > 0:
                level = 255 * (1 - 0.8 * (float(z[r, c]) - low) / (high - low))  # near 1.0, far 0.2
                if abs(level - round(level)) > 1e-3:                             # not at a rounding edge
                    assert np.array_equal(rendering[r, c], hot[int(level)]), (r, c)
            else:
                assert np.array_equal(rendering[r, c], hot[0]) and not foreground[r, c]

    folder = tmp_path / "good"
    (folder / "rgb").mkdir(parents=True)
    (folder / "z").mkdir()
    rgb = rng.integers(1, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb" / "000.png")
    Image.fromarray(z).save(folder / "z" / "000.tiff")
    masked, depth = RGBDReader("rgbd")(folder / "rgb" / "000.png")
    assert np.array_equal(np.array(masked), np.where((z > 0)[..., None], rgb, 0))
    assert np.array_equal(np.array(depth), rendering)
    assert len(RGBDReader("rgb")(folder / "rgb" / "000.png")) == 1


def rgbd_config(weights, **overrides) -> dict:
    cfg = {**load_config(ROOT / "configs/dinomaly2/mvtec3d_uni.yaml"), "encoder": "dinov2_vit_tiny_14",
           "encoder_weights": str(weights), "image_size": 64, "crop_size": 56, **overrides}
    return validate(cfg, "test", note=lambda _: None)


def test_rgb_ratio_one_is_the_rgb_model_and_the_blend_is_per_token(tiny_weights):
    images = torch.randn(2, 6, 56, 56, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    rgbd = build_model(rgbd_config(tiny_weights, rgb_ratio=1.0)).eval()
    torch.manual_seed(0)
    rgb = build_model(rgbd_config(tiny_weights, modality="rgb")).eval()
    with torch.no_grad():
        for a, b in zip(sum(rgbd(images), []), sum(rgb(images[:, :3]), [])):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

        half = build_model(rgbd_config(tiny_weights)).eval()
        fused, groups = half.encode(images)
        layers = [0.5 * a + 0.5 * b for a, b in zip(encoder_layers(half.encoder, images[:, :3], 10),
                                                    encoder_layers(half.encoder, images[:, 3:], 10))]
        layers = [layers[i] for i in half.target_layers]
        torch.testing.assert_close(fused, torch.stack(layers).mean(0), rtol=0, atol=1e-6)
        for group, indices in zip(groups, half.fuse_layer_encoder):
            mean = torch.stack([layers[i] for i in indices]).mean(0)
            target = torch.nn.functional.layer_norm(mean[:, 1:] - mean[:, :1], (mean.shape[-1],), eps=1e-8)
            torch.testing.assert_close(group, target.transpose(1, 2).reshape(group.shape), rtol=0, atol=1e-5)


def test_feature_cache_holds_the_blended_layers(tmp_path, tiny_weights):
    data = tmp_path / "data"
    make_rgbd_dataset(str(data), num_train=4, num_test_good=1, num_test_defect=1, size=64, seed=0)
    cfg = rgbd_config(tiny_weights, data_path=str(data), batch_size=2, num_workers=0)
    model = build_model(cfg).eval()
    train_set = build_train_set(cfg, ["dome"])
    cache = FeatureCache(model, train_set, cfg, torch.device("cpu"), "memory", tmp_path / "features",
                         log=lambda _: None)
    for i in range(len(train_set)):
        (fused, groups), _ = cache[i]
        with torch.no_grad():
            want_fused, want_groups = model.encode(train_set[i][0][None])  # RGB and depth, blended
        assert train_set[i][0].shape[0] == 6
        torch.testing.assert_close(fused, want_fused[0], rtol=1e-5, atol=1e-5)
        for got, want in zip(groups, want_groups):
            torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)


def i_auroc(run_dir) -> float:
    with open(run_dir / "results.csv") as f:
        return float(next(row for row in csv.DictReader(f) if row["class"] == "dome")["I-AUROC"])


def test_depth_only_defects_are_found_by_rgbd_and_not_by_rgb(tmp_path, tiny_weights, capsys):
    data = tmp_path / "data"
    make_rgbd_dataset(str(data), num_train=16, num_test_good=8, num_test_defect=4, size=64, seed=0)
    results = {}
    for modality in ("rgbd", "rgb"):
        args = tiny_run_args(data, tiny_weights, tmp_path / "runs", dataset="mvtec3d", classes="dome",
                             modality=modality, image_size=64, crop_size=56, batch_size=8, total_iters=30,
                             hm_ramp_iters=20, run_name=modality)
        result = run_in_process(train_uni, ["--config", ROOT / "configs/dinomaly2/mvtec3d_uni.yaml", *args], capsys)
        assert result.returncode == 0, result.stderr
        results[modality] = i_auroc(tmp_path / "runs" / modality)
    assert results["rgbd"] >= 90, results
    assert results["rgb"] == pytest.approx(50.0), results  # each defective image has a normal one's RGB image
    check_tools_on_the_rgbd_run(tmp_path, data / "dome" / "test", tmp_path / "runs" / "rgbd", results["rgbd"], capsys)


def check_tools_on_the_rgbd_run(tmp_path, test_dir, run_dir, trained_i_auroc, capsys):
    """evaluate.py reproduces the run's table, predict.py scores rgb + z pairs as the run did (the
    depth-only defects rank above the normal images), export.py refuses in one line."""
    checkpoint = run_dir / "checkpoint.pth"
    out = tmp_path / "eval"
    assert run_in_process(evaluate, ["--checkpoint", checkpoint, "--out", out], capsys).returncode == 0
    assert i_auroc(out) == pytest.approx(trained_i_auroc)
    result = run_in_process(predict, ["--checkpoint", checkpoint, "--images", test_dir, "--out", tmp_path / "pred",
                                      "--no_heatmaps"], capsys)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "pred" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list(test_dir.glob("*/rgb/*.png")))
    labels = [0 if "/good/" in row["file"].replace("\\", "/") else 1 for row in rows]
    assert 100 * roc_auc_score(labels, [float(row["score"]) for row in rows]) == pytest.approx(trained_i_auroc)
    refused = run_in_process(export, ["--checkpoint", checkpoint, "--out", tmp_path / "m.onnx"], capsys)
    assert refused.returncode != 0 and "not supported" in refused.stderr and "Traceback" not in refused.stderr
