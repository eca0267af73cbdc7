"""What a new user gets wrong, answered in one line naming the culprit; same-command resume; run names;
bf16 only where it helps; per-rank random streams; training curves and plots."""
import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import predict
import train_uni
from conftest import ROOT, run_in_process, run_script, tiny_run_args
from test_reliability import assert_identical, interrupt_after_first_checkpoint, wait_for
from utils import device as device_module
from utils.config import DEFAULTS
from utils.device import effective_precision


def truncate(path: Path) -> None:
    """Keep the header and cut the pixel data: the file opens, decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def data(synthetic_data, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    return root


def assert_one_line_error(result: subprocess.CompletedProcess, culprit: str) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and culprit in error[0], result.stderr[-3000:]


def test_truncated_image_is_found_before_training(data, tiny_weights, tmp_path, capsys):
    truncate(data / "stripes" / "train" / "good" / "004.png")
    result = run_in_process(train_uni, tiny_run_args(data, tiny_weights, tmp_path / "out"), capsys)
    assert_one_line_error(result, "stripes/train/good/004.png")
    assert not (tmp_path / "out").exists()


def test_truncated_image_with_the_image_cache_is_found_by_the_caches_decoding(data, tiny_weights, tmp_path, capsys):
    """With --image_cache the up-front check reads training headers only: the cache decodes every
    training image in full before the first step, so it is the one that names the file."""
    truncate(data / "stripes" / "train" / "good" / "004.png")
    result = run_in_process(train_uni, tiny_run_args(data, tiny_weights, tmp_path / "out", image_cache="memory"),
                            capsys)
    assert_one_line_error(result, "stripes/train/good/004.png")
    assert "caching images" in result.stderr and not (tmp_path / "out" / "run" / "checkpoint.pth").exists()


def test_image_broken_during_training_saves_a_resumable_checkpoint(data, tiny_weights, tmp_path):
    good = (data / "stripes" / "train" / "good" / "004.png").read_bytes()
    truncate(data / "stripes" / "train" / "good" / "004.png")
    args = tiny_run_args(data, tiny_weights, tmp_path, total_iters=12, warmup_iters=2, classes="stripes",
                         check_images="header")
    result = run_script("train_uni.py", args, check=False)
    assert_one_line_error(result, "stripes/train/good/004.png")
    assert "checkpoint saved at step" in result.stderr and f"--resume {tmp_path / 'run'}" in result.stderr
    (data / "stripes" / "train" / "good" / "004.png").write_bytes(good)
    run_script("train_uni.py", ["--resume", tmp_path / "run"])
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["step"] == 12


def _zip_file(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")


def _garbage(kind: str, path: Path) -> None:
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "zip":
        _zip_file(path)
    elif kind == "another model":
        torch.save({"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, path)
    elif kind == "wrapped":
        torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, path)
    elif kind == "a tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "truncated":
        torch.save({"fc.weight": torch.zeros(64, 64)}, path)
        truncate(path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled object":
        torch.save({"model": Path("x")}, path)  # a Python object that weights_only refuses


# (case, how to break it, extra args, culprit that the one-line error must name)
USER_MISTAKES = [
    ("missing data_path", None, {"data_path": "/nowhere/data"}, "/nowhere/data"),
    ("class without train folder", lambda d: shutil.rmtree(d / "stripes" / "train"), {"classes": "checker,stripes"},
     "stripes/train"),
    ("defect image without mask", lambda d: (d / "stripes" / "ground_truth" / "hole" / "000_mask.png").unlink(),
     {}, "000_mask.png"),
    ("mask of another size", lambda d: Image.new("L", (20, 20)).save(d / "stripes" / "ground_truth" / "hole" / "000_mask.png"),
     {}, "000_mask.png"),
    ("text file as image", lambda d: (d / "checker" / "test" / "good" / "001.png").write_text("hi"), {},
     "checker/test/good/001.png"),
    ("unknown class", None, {"classes": "stripes,zebra"}, "zebra"),
    ("unknown key", None, {"learning_rate": "1"}, "--learning_rate"),
    ("bad value", None, {"dropout": "2"}, "dropout"),
    ("missing config file", None, {"config": "nowhere.yaml"}, "nowhere.yaml"),
    ("unknown encoder", None, {"encoder": "dinov2_vit_smal_14"}, "did you mean 'dinov2_vit_small_14'"),
    ("missing weights", None, {"encoder_weights": "/no/such/weights.pth"}, "/no/such/weights.pth"),
    ("unknown device", None, {"device": "tpu"}, "tpu"),
    ("cuda without cuda", None, {"device": "cuda"}, "CUDA is not available"),
    ("resume of a missing run", None, {"resume": "/no/run"}, "/no/run/config.yaml"),
]


@pytest.mark.parametrize("case,damage,args,culprit", USER_MISTAKES, ids=[c[0] for c in USER_MISTAKES])
def test_user_mistakes_are_one_line_errors(data, tiny_weights, tmp_path, capsys, case, damage, args, culprit):
    if damage:
        damage(data)
    argv = tiny_run_args(data, tiny_weights, tmp_path / "out", **{k: v for k, v in args.items()
                                                                   if k not in ("config", "resume", "learning_rate")})
    argv += [item for k in ("config", "resume", "learning_rate") if k in args for item in (f"--{k}", args[k])]
    assert_one_line_error(run_in_process(train_uni, argv, capsys), culprit)
    assert not (tmp_path / "out").exists()


GARBAGE = {"random bytes": "neither a zip archive nor a pickle", "text": "a text file", "zip": "a zip archive of "
           "something else", "another model": "missing keys", "wrapped": "'model' holds a dict", "a tensor": "hold a Tensor",
           "truncated": "damaged or truncated", "empty": "empty", "pickled object": "Python objects other than tensors"}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_weights_file_is_one_line_naming_it_before_any_run_directory(data, tmp_path, capsys, kind):
    path = tmp_path / "weights.pth"
    _garbage(kind, path)
    result = run_in_process(train_uni, tiny_run_args(data, path, tmp_path / "out"), capsys)
    assert_one_line_error(result, str(path))
    assert GARBAGE[kind] in result.stderr and "weights_only=False" not in result.stderr.replace(" ", "")
    assert not (tmp_path / "out").exists()


def test_offline_official_weights_leave_no_run_directory(data, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    argv = tiny_run_args(data, "x", tmp_path / "out", encoder="dinov2_vit_small_14", weights_dir=tmp_path / "cache")
    argv = argv[:argv.index("--encoder_weights")] + argv[argv.index("--encoder_weights") + 2:]
    for _ in range(2):  # the next attempt neither
        result = run_in_process(train_uni, argv, capsys)
        assert_one_line_error(result, "dinov2_vits14_pretrain.pth")
        assert "put it at" in result.stderr and not (tmp_path / "out").exists()
    dinov3 = tiny_run_args(data, "x", tmp_path / "out", encoder="dinov3_vit_base_16", image_size=128, crop_size=112)
    dinov3 = dinov3[:dinov3.index("--encoder_weights")] + dinov3[dinov3.index("--encoder_weights") + 2:]
    assert_one_line_error(run_in_process(train_uni, dinov3, capsys), "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth")
    assert not (tmp_path / "out").exists()


def test_cheap_mistakes_are_reported_before_any_download_or_run_directory(tmp_path, capsys, monkeypatch):
    """The README's first command without the dataset, and layer indices beyond the encoder: one line each,
    with no attempt to fetch the 350 MB encoder (no network here) and nothing written."""
    downloads = []

    def offline(*args, **kwargs):
        downloads.append(args)
        raise urllib.error.URLError("no network")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    common = ["--output_dir", tmp_path / "out", "--weights_dir", tmp_path / "weights", "--device", "cpu"]
    result = run_in_process(train_uni, ["--data_path", tmp_path / "mvtec_anomaly_detection", *common], capsys)
    assert_one_line_error(result, f"data_path does not exist or is not a folder: {tmp_path / 'mvtec_anomaly_detection'}")
    result = run_in_process(train_uni, ["--target_layers", "2,3,4,5,6,7,8,40", *common], capsys)
    assert_one_line_error(result, "target_layers [2, 3, 4, 5, 6, 7, 8, 40] must be strictly increasing block "
                                  "indices in 0..11")
    result = run_in_process(train_uni, ["--fuse_layer_encoder", "[[0,1,2,3],[4,5,6,9]]", *common], capsys)
    assert_one_line_error(result, "fuse_layer_encoder [[0, 1, 2, 3], [4, 5, 6, 9]] must be non-empty groups of "
                                  "indices in 0..7")
    assert downloads == [] and not (tmp_path / "weights").exists() and not (tmp_path / "out").exists()


def test_an_output_folder_that_is_a_file_is_one_line(data, tiny_weights, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for out in (taken, taken / "sub"):
        result = run_in_process(train_uni, tiny_run_args(data, tiny_weights, out), capsys)
        assert_one_line_error(result, f"{taken} is a file, expected a folder")


def test_checkpoint_and_run_directory_mistakes(trained_run, tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    assert_one_line_error(run_in_process(evaluate, ["--checkpoint", garbage], capsys), str(garbage))
    assert_one_line_error(run_in_process(evaluate, ["--run_dir", tmp_path / "none"], capsys), str(tmp_path / "none"))
    assert_one_line_error(run_in_process(predict, ["--checkpoint", trained_run / "checkpoint.pth", "--images",
                                                   tmp_path / "no_images", "--out", tmp_path / "p"], capsys),
                          str(tmp_path / "no_images"))
    other = tmp_path / "other.pth"
    torch.save({"format": "something else"}, other)
    assert_one_line_error(run_in_process(predict, ["--checkpoint", other, "--images", tmp_path, "--out",
                                                   tmp_path / "p"], capsys), str(other))
    # and through the real entry point once: the same line, no traceback, exit status 1
    result = run_script("evaluate.py", ["--checkpoint", garbage], check=False)
    assert_one_line_error(result, str(garbage))
    assert result.returncode == 1


def test_same_command_with_resume_continues_and_only_real_changes_are_refused(data, tiny_weights, tmp_path):
    args = tiny_run_args(data, tiny_weights, tmp_path, total_iters=30, warmup_iters=5, ckpt_every=5,
                         classes="stripes")
    interrupt_after_first_checkpoint("train_uni.py", args, tmp_path / "run")
    changed = run_script("train_uni.py", args + ["--resume", "--lr", "0.01", "--seed", "3"], check=False)
    assert_one_line_error(changed, "--lr cannot change when resuming (0.01 given, 0.002 in")
    assert "--seed cannot change when resuming (3 given, 1 in" in changed.stderr
    run_script("train_uni.py", args + ["--resume"])  # the same command, --resume added
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["step"] == 30
    run_script("train_uni.py", ["--resume", tmp_path / "run"])  # the run directory alone (already finished)


def test_run_name_says_what_was_trained(data, tiny_weights, tmp_path, capsys):
    args = tiny_run_args(data, tiny_weights, tmp_path / "out", total_iters=3, warmup_iters=1, classes="stripes")
    argv = [a for i, a in enumerate(args) if "--run_name" not in (a, args[i - 1] if i else "")]
    assert run_in_process(train_uni, argv, capsys).returncode == 0
    (run_dir,) = (tmp_path / "out").iterdir()
    assert run_dir.name.startswith("folder_uni_stripes_dinov2_vit_tiny_14_"), run_dir.name


def test_bf16_falls_back_to_fp32_on_a_cpu_that_emulates_it(monkeypatch):
    cfg = {**DEFAULTS, "precision": "bf16"}
    notes = []
    monkeypatch.setattr(device_module, "cpu_bf16_native", lambda: False)
    assert effective_precision(cfg, torch.device("cpu"), notes.append) == "fp32"
    assert "no native bf16" in notes[0] and "--allow_emulated_bf16 true" in notes[0]
    assert effective_precision({**cfg, "allow_emulated_bf16": True}, torch.device("cpu"), notes.append) == "bf16"
    monkeypatch.setattr(device_module, "cpu_bf16_native", lambda: True)
    assert effective_precision(cfg, torch.device("cpu"), notes.append) == "bf16" and len(notes) == 1


def test_benchmark_has_an_fp32_cache_mode_and_names_the_cpu(tiny_weights):
    result = run_script("benchmarks/train_speed.py", ["--encoder", "dinov2_vit_tiny_14", "--encoder_weights",
                                                      tiny_weights, "--image_size", "64", "--crop_size", "56",
                                                      "--batch_size", "2", "--device", "cpu", "--steps", "1",
                                                      "--warmup_steps", "0", "--only_mode", "fp32+cache"])
    measured = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert measured["mode"] == "fp32+cache" and measured["s_per_step"] > 0
    assert "torch kernels" in measured["cpu"] and ("bf16 native" in measured["cpu"] or "bf16 emulated" in measured["cpu"])


def _torchrun(args: list, run_name: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_uni.py")] + [str(a) for a in args] + ["--run_name", run_name],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_ranks_draw_their_own_noise_and_resume_exactly_under_torchrun(synthetic_data, tiny_weights, tmp_path):
    args = tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=12, warmup_iters=2, batch_size=4,
                         ckpt_every=3, classes="stripes")
    args = [a for i, a in enumerate(args) if "--run_name" not in (a, args[i - 1] if i else "")]
    straight = _torchrun(args, "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
    killed = _torchrun(args, "killed")
    wait_for(tmp_path / "killed" / "checkpoint.pth", killed)
    checkpoint = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)
    assert len(checkpoint["rng"]) == 2 and not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    killed.send_signal(signal.SIGTERM)
    killed.wait(timeout=600)
    step = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)["step"]
    assert step < 12
    resumed = _torchrun(["--resume", tmp_path / "killed"], "killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert_identical(tmp_path / "killed" / "checkpoint.pth", tmp_path / "straight" / "checkpoint.pth")


def test_curves_and_plots_are_written(trained_run):
    with open(trained_run / "train_steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert [int(r["step"]) for r in steps] == list(range(1, 201))
    assert all(math.isfinite(float(r[k])) for r in steps for k in ("loss", "lr", "grad_norm", "s_per_step"))
    assert float(steps[-1]["hm_easy_share"]) == pytest.approx(0.9)
    with open(trained_run / "eval_metrics.csv") as f:
        evals = list(csv.DictReader(f))
    assert [(r["step"], r["class"]) for r in evals] == [(s, c) for s in ("100", "200")
                                                        for c in ("checker", "stripes", "mean")]
    for name in ("curves.png", "metrics.png", "per_class.png"):
        with Image.open(trained_run / name) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_compare_runs_lists_differing_keys_and_metrics(trained_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    config = (other / "config.yaml").read_text().replace("dropout: 0.2", "dropout: 0.3")
    (other / "config.yaml").write_text(config)
    result = run_script("compare_runs.py", [trained_run, other, "--out", tmp_path / "cmp"])
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| run | dropout |" in text and "| other | 0.3 |" in text
    mean = next(r for r in csv.DictReader(io.StringIO((trained_run / "results.csv").read_text())) if r["class"] == "mean")
    assert f"{float(mean['I-AUROC']):.2f}" in text and result.returncode == 0
    with Image.open(tmp_path / "cmp" / "loss.png") as image:
        assert image.format == "PNG"


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from utils.checkpoint import CheckpointWriteError, save_checkpoint
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"step": 1})

    def full_disk(obj, f):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as error:
        save_checkpoint(path, {"step": 2})
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "No space left on device" in message
    assert "is intact" in message and not (tmp_path / "checkpoint.pth.tmp").exists()
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
