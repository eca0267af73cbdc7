"""evaluate.py and predict.py end to end on a checkpoint trained in the test, plus their pieces."""
import csv
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import evaluate
import predict
from conftest import run_in_process, run_script
from datasets import TestSample
from utils.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from utils.evaluation import ClassOutputs, binarise_masks, defect_rows
from utils.metrics import aupro, class_metrics, ranking_metrics


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluate_reproduces_training_results_and_writes_maps(trained_run, tmp_path):
    out = tmp_path / "eval"
    result = run_script("evaluate.py", ["--checkpoint", trained_run / "checkpoint.pth", "--out", out,
                                        "--save_maps", 3, "--num_workers", 0])
    trained = {r["class"]: r for r in read_rows(trained_run / "results.csv")}
    evaluated = {r["class"]: r for r in read_rows(out / "results.csv")}
    assert trained == evaluated
    assert "images/s" in result.stdout and "peak memory" in result.stdout
    assert "| mean |" in (out / "results.md").read_text()
    for name in ("checker", "stripes"):
        assert len(list((out / "maps" / name).glob("*.png"))) == 3
    defects = read_rows(out / "results_per_defect.csv")
    assert {(r["class"], r["defect"]) for r in defects} == {(c, d) for c in ("checker", "stripes")
                                                            for d in ("blob", "hole", "scratch")}


def test_evaluate_in_bf16_moves_the_metrics_by_rounding_only(trained_run, tmp_path, capsys):
    """evaluate.py --precision bf16 (emulated where the CPU has no bf16 units): every class's image and pixel
    AUROC within 0.5 points of training's fp32 evaluation, and the scores really moved."""
    result = run_in_process(evaluate, ["--checkpoint", trained_run / "checkpoint.pth", "--out", tmp_path / "e",
                                       "--num_workers", 0, "--precision", "bf16", "--allow_emulated_bf16", "true"],
                            capsys)
    assert result.returncode == 0 and "on cpu, bf16" in result.stdout
    trained = {r["class"]: r for r in read_rows(trained_run / "results.csv")}
    evaluated = {r["class"]: r for r in read_rows(tmp_path / "e" / "results.csv")}
    assert trained.keys() == evaluated.keys()
    for name in trained:
        for metric in ("I-AUROC", "P-AUROC"):
            assert abs(float(evaluated[name][metric]) - float(trained[name][metric])) <= 0.5, (name, metric)
    assert any(evaluated[n]["P-AP"] != trained[n]["P-AP"] for n in trained)


def test_evaluate_run_dir_and_protocol_override(trained_run, tmp_path):
    out = tmp_path / "eval"
    run_script("evaluate.py", ["--run_dir", trained_run, "--out", out, "--gt_threshold", "0.5",
                               "--classes", "stripes", "--num_workers", "0"])
    rows = read_rows(out / "results.csv")
    assert [r["class"] for r in rows] == ["stripes", "mean"]
    assert "gt_threshold: 0.5" in (out / "eval_config.yaml").read_text()


def test_evaluate_errors_name_the_path(trained_run, tmp_path, capsys):
    missing = tmp_path / "nothing" / "checkpoint.pth"
    result = run_in_process(evaluate, ["--checkpoint", missing], capsys)
    assert result.returncode != 0 and f"checkpoint not found: {missing}" in result.stderr
    result = run_in_process(evaluate, ["--run_dir", tmp_path], capsys)
    assert result.returncode != 0 and f"no checkpoint.pth in {tmp_path}" in result.stderr
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    result = run_in_process(evaluate, ["--checkpoint", garbage], capsys)
    assert result.returncode != 0 and f"could not read checkpoint {garbage}" in result.stderr


def test_checkpoint_of_another_architecture_is_rejected(trained_run, tmp_path, capsys):
    checkpoint = load_checkpoint(trained_run / "checkpoint.pth")
    checkpoint["config"] = {**checkpoint["config"], "encoder": "dinov2_vit_small_14", "encoder_weights": "random"}
    path = tmp_path / "other.pth"
    save_checkpoint(path, {k: v for k, v in checkpoint.items() if k not in ("format", "path")})
    with pytest.raises(CheckpointError) as error, pytest.warns(UserWarning):
        model_from_checkpoint(load_checkpoint(path))
    assert str(path) in str(error.value) and "shape mismatches" in str(error.value)
    with pytest.warns(UserWarning):
        result = run_in_process(evaluate, ["--checkpoint", path], capsys)
    assert result.returncode != 0 and "does not match the architecture" in result.stderr


def test_predict_scores_labels_and_lists_unreadable_files(trained_run, synthetic_data, tmp_path):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    shutil.copy(synthetic_data / "stripes" / "test" / "blob" / "000.png", images / "defect.png")
    shutil.copy(synthetic_data / "stripes" / "test" / "good" / "000.png", images / "nested" / "good.png")
    (images / "broken.png").write_bytes(b"not an image")
    (images / "readme.txt").write_text("ignored: not an image extension")
    out = tmp_path / "pred"
    result = run_script("predict.py", ["--checkpoint", trained_run / "checkpoint.pth", "--images", images,
                                       "--out", out, "--threshold", "f1", "--class_name", "stripes"])
    assert f"could not read {images / 'broken.png'}" in result.stderr
    rows = {r["file"]: r for r in read_rows(out / "scores.csv")}
    assert set(rows) == {str(images / "defect.png"), str(images / "nested" / "good.png")}
    threshold = load_checkpoint(trained_run / "checkpoint.pth")["results"]["stripes"]["image_threshold"]
    for row in rows.values():
        assert row["anomalous"] == str(int(float(row["score"]) >= threshold))
    assert float(rows[str(images / "defect.png")]["score"]) > float(rows[str(images / "nested" / "good.png")]["score"])
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["defect.png", "nested__good.png"]


def test_predict_fails_when_nothing_is_processed(trained_run, tmp_path, capsys):
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"junk")
    args = ["--checkpoint", trained_run / "checkpoint.pth", "--out", tmp_path / "o"]
    result = run_in_process(predict, args + ["--images", only_bad], capsys)
    assert result.returncode == 1 and "0 images scored, 1 unreadable" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_in_process(predict, args + ["--images", empty], capsys)
    assert result.returncode != 0 and "no images" in result.stderr and str(empty) in result.stderr
    result = run_in_process(predict, args + ["--images", only_bad, "--threshold", "f1"], capsys)
    assert result.returncode != 0 and "--threshold f1 needs --class_name, one of: checker, stripes" in result.stderr


def test_defect_breakdown_matches_direct_auroc():
    rng = np.random.default_rng(0)
    defects = ["good"] * 6 + ["blob"] * 4 + ["hole"] * 3
    labels = torch.tensor([d != "good" for d in defects])
    masks = torch.zeros(13, 16, 16, dtype=torch.bool)
    masks[6:, 4:9, 4:9] = True
    maps = torch.from_numpy(rng.random((13, 16, 16)).astype(np.float32)) + masks * 0.3
    scores = torch.from_numpy(rng.random(13).astype(np.float32)) + labels * 0.5
    dataset = type("D", (), {"samples": [TestSample(None, None, int(d != "good"), d, "c") for d in defects]})
    rows = defect_rows(ClassOutputs(maps, scores, labels, masks, 0.0), dataset)
    for row in rows:
        keep = np.array([d in ("good", row["defect"]) for d in defects])
        assert row["I-AUROC"] == pytest.approx(roc_auc_score(labels.numpy()[keep], scores.numpy()[keep]), abs=1e-12)
        assert row["P-AUROC"] == pytest.approx(roc_auc_score(masks.numpy()[keep].ravel(), maps.numpy()[keep].ravel()),
                                                abs=1e-12)
    assert [r["images"] for r in rows] == [4, 3]


def test_gt_threshold_option():
    mask = torch.tensor([[0.0, 0.3], [0.5, 0.9]]).view(1, 1, 2, 2)
    assert binarise_masks(mask, 2, 0.0).sum() == 3
    assert binarise_masks(mask, 2, 0.5).sum() == 1


def test_chunked_sort_path_matches_sklearn_on_large_data():
    """Over a million scores are sorted in parallel chunks; counts over chunks must stay exact."""
    rng = np.random.default_rng(1)
    labels = rng.random(2_500_000) < 0.02
    scores = (np.round(rng.normal(size=labels.size), 3) + labels).astype(np.float32)
    got = ranking_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_aupro_paths_agree():
    """class_metrics counts normal pixels by binary search, aupro alone by binning: same value."""
    rng = np.random.default_rng(2)
    maps = torch.from_numpy(rng.random((20, 64, 64)).astype(np.float32))
    masks = torch.from_numpy(rng.random((20, 64, 64)) < 0.05)
    masks[:8] = False
    row = class_metrics(maps.flatten(1).max(1).values, masks.flatten(1).any(1), maps, masks)
    assert row["AUPRO"] == aupro(maps, masks)


def test_main_table_run_shows_the_papers_per_class_numbers(tmp_path):
    from datasets import CLASSES
    from utils.evaluation import EvaluationResult, paper_per_class, write_tables
    for dataset in ("mvtec", "visa", "realiad"):
        assert sorted(paper_per_class(dataset)) == sorted(CLASSES[dataset]), dataset  # same class names
    paper = paper_per_class("mvtec")
    metrics = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
    rows = {name: {**{k: 0.9 for k in metrics}, "mAD": 0.9} for name in ("bottle", "screw")}
    write_tables(tmp_path, EvaluationResult(rows, [], 0, 0.0), paper=paper)
    text = (tmp_path / "results.md").read_text()
    assert "| bottle | 90.00 / 100.0 / -10.00 |" in text
    screw_pap = paper["screw"][4]
    assert f"90.00 / {screw_pap:.1f} / {90 - screw_pap:+.2f}" in text
    mean_auroc = (paper["bottle"][0] + paper["screw"][0]) / 2
    assert f"| mean | 90.00 / {mean_auroc:.1f} / {90 - mean_auroc:+.2f}" in text



def test_a_run_with_image_labels_only(synthetic_data, tiny_weights, trained_run, tmp_path, capsys):
    """masks: none needs no ground_truth folder and leaves the pixel cells empty; the same model scored
    with the masks gives the same image metrics, so masks: none changes nothing else."""
    import compare_runs
    import reproduce
    import train_uni
    from conftest import tiny_run_args
    from test_usability import assert_one_line_error
    labels_only = tmp_path / "data"
    shutil.copytree(synthetic_data, labels_only, ignore=shutil.ignore_patterns("ground_truth"))
    args = tiny_run_args(labels_only, tiny_weights, tmp_path / "runs", total_iters=2, warmup_iters=1, image_size=64,
                         crop_size=56, classes="stripes")
    assert_one_line_error(run_in_process(train_uni, args, capsys), "missing masks of defect")  # masks: required
    assert run_in_process(train_uni, args + ["--masks", "none"], capsys).returncode == 0
    run = tmp_path / "runs" / "run"
    image_only = read_rows(run / "results.csv")
    assert [r["class"] for r in image_only] == ["stripes", "mean"]
    pixel = ("P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD")
    assert all([row[k] for k in pixel] == [""] * 5 and float(row["I-AUROC"]) > 0 for row in image_only)
    assert "image labels only (masks: none)" in (run / "results.md").read_text()
    assert "image labels only (masks: none)" in (run / "log.txt").read_text()
    assert all(r["P-AP"] == "" and r["I-AUROC"] for r in read_rows(run / "eval_metrics.csv"))
    assert all(r["P-AUROC"] == "" and r["I-AUROC"] for r in read_rows(run / "results_per_defect.csv"))
    assert (run / "metrics.png").is_file() and (run / "per_class.png").is_file()
    stored = load_checkpoint(run / "checkpoint.pth", note=lambda _: None)["results"]["stripes"]
    assert stored["P-AUROC"] is None and stored["pixel_threshold"] == stored["image_threshold"]

    result = run_in_process(evaluate, ["--checkpoint", run, "--out", tmp_path / "eval", "--masks", "required",
                                       "--data_path", synthetic_data, "--save_maps", 1], capsys)
    with_masks = read_rows(tmp_path / "eval" / "results.csv")
    assert result.returncode == 0 and all(float(row[k]) > 0 for row in with_masks for k in pixel)
    image = ("class", "I-AUROC", "I-AP", "I-F1max")
    assert [[row[k] for k in image] for row in with_masks] == [[row[k] for k in image] for row in image_only]
    assert reproduce.mean_row(run) == {**{k: float(image_only[-1][k]) for k in image[1:]}, **dict.fromkeys(pixel[:4])}
    assert run_in_process(compare_runs, [trained_run, run, "--out", tmp_path / "cmp"], capsys).returncode == 0
    means = (tmp_path / "cmp" / "comparison.md").read_text().split("## Mean over classes")[1]
    assert f"| {run} | {float(image_only[-1]['I-AUROC']):.2f} |" in means and means.count("|  |  |  |  |  |") == 1


def test_normalize_puts_the_threshold_at_one_half_and_keeps_the_order():
    from predict_onnx import normalize
    scale = [0.2, 0.5, 1.4]  # min, F1-max threshold, max
    values = np.concatenate([np.random.default_rng(0).uniform(-0.5, 2.0, 1000), scale])
    got = normalize(values, scale)
    assert np.abs(got - np.interp(values, scale, [0.0, 0.5, 1.0])).max() <= 1e-12  # piecewise linear, clipped
    assert normalize(scale, scale).tolist() == [0.0, 0.5, 1.0]
    assert np.all(np.diff(got[np.argsort(values)]) >= 0)
    assert normalize([0.1, 0.2, 0.3], [0.2, 0.2, 0.2]).tolist() == [0.0, 0.5, 1.0]  # a degenerate range: no NaN


def test_predict_normalize_writes_scores_in_0_1_with_the_threshold_at_one_half(trained_run, synthetic_data, tmp_path,
                                                                              capsys):
    from test_usability import assert_one_line_error
    images = synthetic_data / "stripes" / "test"
    args = ["--checkpoint", trained_run / "checkpoint.pth", "--images", images, "--normalize"]
    result = run_in_process(predict, args + ["--class_name", "stripes", "--threshold", "f1", "--out", tmp_path / "p"],
                            capsys)
    assert result.returncode == 0 and "threshold 0.500000" in result.stdout
    row = load_checkpoint(trained_run / "checkpoint.pth", note=lambda _: None)["results"]["stripes"]
    scores = read_rows(tmp_path / "p" / "scores.csv")
    raw = np.array([float(r["raw_score"]) for r in scores])
    low, threshold, high = row["score_min"], row["image_threshold"], row["score_max"]
    expected = np.interp(raw, [low, threshold, high], [0.0, 0.5, 1.0])
    slope = 0.5 / min(threshold - low, high - threshold)  # raw_score is written to 6 decimals
    assert np.abs(np.array([float(r["score"]) for r in scores]) - expected).max() <= 1e-6 + 5e-7 * slope
    assert all(r["anomalous"] == str(int(s >= threshold)) for r, s in zip(scores, raw) if abs(s - threshold) > 1e-6)
    assert {r["anomalous"] for r in scores} == {"0", "1"} and len(list((tmp_path / "p" / "heatmaps").iterdir())) == 20
    assert_one_line_error(run_in_process(predict, args + ["--out", tmp_path / "q"], capsys),
                          "--normalize needs --class_name, one of: checker, stripes")

    old = load_checkpoint(trained_run / "checkpoint.pth", note=lambda _: None)
    old["results"] = {name: {k: v for k, v in r.items() if k not in ("score_min", "score_max")}
                      for name, r in old["results"].items()}
    save_checkpoint(tmp_path / "old.pth", {k: v for k, v in old.items() if k not in ("format", "path")})
    assert_one_line_error(run_in_process(predict, ["--checkpoint", tmp_path / "old.pth", "--images", images,
                                                   "--normalize", "--out", tmp_path / "o"], capsys),
                          f"{tmp_path / 'old.pth'} stores no score scale")
    assert not (tmp_path / "o").exists()


def test_bf16_scoring_stores_the_casts_autocast_would_make(trained_run, synthetic_data):
    """Weights cast once before scoring give bit for bit the maps of autocast casting them at every call,
    for DINOv2 (the trained miniature) and DINOv3 (RoPE, registers, LayerScale) encoders."""
    from models import build_model
    from utils.device import store_weights_for_autocast
    from utils.evaluation import predict_maps
    checkpoint = load_checkpoint(trained_run / "checkpoint.pth", note=lambda _: None)
    cfg = checkpoint["config"]
    dinov3_cfg = {**cfg, "encoder": "dinov3_vit_tiny_16", "encoder_weights": "random", "crop_size": 112}
    images = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    for model in (model_from_checkpoint(checkpoint, cfg), build_model(dinov3_cfg)):
        autocast_maps, autocast_scores = predict_maps(model.eval(), images, cfg, "bf16")
        stored_maps, stored_scores = predict_maps(store_weights_for_autocast(model, "bf16"), images, cfg, "bf16")
        assert torch.equal(stored_maps, autocast_maps) and torch.equal(stored_scores, autocast_scores)
        assert stored_maps.dtype == torch.float32 and model.decoder[0].attn.qkv.weight.dtype == torch.bfloat16
        fp32_maps, _ = predict_maps(model.float(), images, cfg)
        assert 0 < (fp32_maps - stored_maps).abs().max() < 0.05  # bf16 really ran, and only rounded


def test_predict_in_bf16_ranks_as_fp32_does(trained_run, synthetic_data, tmp_path, capsys):
    """predict.py --precision bf16 (emulated where the CPU has no bf16 units, so the test runs anywhere):
    scores within 5% of fp32's (the miniature's maps are 64 channels wide; a ViT-B's move far less, README),
    the same image AUROC on the test set."""
    images = synthetic_data / "stripes" / "test"
    args = ["--checkpoint", trained_run / "checkpoint.pth", "--images", images, "--no_heatmaps"]
    assert run_in_process(predict, args + ["--out", tmp_path / "fp32"], capsys).returncode == 0
    result = run_in_process(predict, args + ["--out", tmp_path / "bf16", "--precision", "bf16",
                                             "--allow_emulated_bf16", "true"], capsys)
    assert result.returncode == 0, result.stderr
    fp32 = {r["file"]: float(r["score"]) for r in read_rows(tmp_path / "fp32" / "scores.csv")}
    bf16 = {r["file"]: float(r["score"]) for r in read_rows(tmp_path / "bf16" / "scores.csv")}
    assert fp32.keys() == bf16.keys() and len(fp32) == 20
    relative = [abs(bf16[f] - fp32[f]) / fp32[f] for f in fp32]
    assert 0 < max(relative) < 0.05
    labels = [int("/good/" not in f) for f in fp32]
    auroc = {name: 100 * roc_auc_score(labels, [s[f] for f in fp32]) for name, s in (("fp32", fp32), ("bf16", bf16))}
    assert abs(auroc["bf16"] - auroc["fp32"]) <= 0.5


def test_predict_precision_mistakes_are_one_line(trained_run, synthetic_data, tmp_path, capsys, monkeypatch):
    from test_usability import assert_one_line_error
    import utils.device
    args = ["--checkpoint", trained_run / "checkpoint.pth", "--images", synthetic_data / "stripes" / "test"]
    assert_one_line_error(run_in_process(predict, args + ["--out", tmp_path / "a", "--precision", "fp16"], capsys),
                          "precision fp16 needs a CUDA device")
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(utils.device, "cpu_bf16_native", lambda: False)
    result = run_in_process(predict, args + ["--out", tmp_path / "b", "--precision", "bf16", "--no_heatmaps"], capsys)
    assert result.returncode == 0 and "this CPU has no native bf16" in result.stdout and "uses fp32" in result.stdout
