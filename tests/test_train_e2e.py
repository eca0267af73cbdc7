"""train_uni.py and train_sep.py run as a user would run them, on synthetic defects, on CPU."""
import csv

import torch

import train_uni
from conftest import run_in_process, run_script, tiny_run_args


def read_table(path) -> dict[str, dict[str, float]]:
    with open(path) as f:
        return {row["class"]: {k: float(v) for k, v in row.items() if k != "class"} for row in csv.DictReader(f)}


def test_train_uni_detects_synthetic_defects(trained_run):
    run_dir = trained_run
    for name in ("config.yaml", "log.txt", "results.csv", "results.md", "results_per_defect.csv", "checkpoint.pth"):
        assert (run_dir / name).is_file(), name
    table = read_table(run_dir / "results.csv")
    assert set(table) == {"checker", "stripes", "mean"}
    assert table["mean"]["I-AUROC"] >= 90.0, table
    assert table["mean"]["P-AUROC"] >= 80.0, table
    log = (run_dir / "log.txt").read_text()
    assert "step 100: evaluating" in log and "step 200: evaluating" in log
    checkpoint = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert checkpoint["config"]["total_iters"] == 200 and checkpoint["classes"] == ["checker", "stripes"]
    assert any(k.startswith("decoder.7.") for k in checkpoint["model"])
    assert not any(k.startswith("encoder.") for k in checkpoint["model"])


def test_train_sep_trains_one_model_per_class(synthetic_data, tiny_weights, tmp_path):
    run_script("train_sep.py", tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=30))
    run_dir = tmp_path / "run"
    table = read_table(run_dir / "results.csv")
    assert set(table) == {"checker", "stripes", "mean"}
    for name in ("checker", "stripes"):
        checkpoint = torch.load(run_dir / name / "checkpoint.pth", weights_only=True)
        assert checkpoint["classes"] == [name]


def test_existing_run_directory_is_not_overwritten(synthetic_data, tiny_weights, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    result = run_in_process(train_uni, tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=5,
                                                     warmup_iters=1), capsys)
    assert result.returncode != 0 and "already exists" in result.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"


def test_bad_data_path_fails_before_creating_a_run(tiny_weights, tmp_path, capsys):
    result = run_in_process(train_uni, tiny_run_args(tmp_path / "missing", tiny_weights, tmp_path / "out"), capsys)
    assert result.returncode != 0 and f"data_path does not exist or is not a folder: {tmp_path / 'missing'}" in result.stderr
    assert not (tmp_path / "out").exists()
