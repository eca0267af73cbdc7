"""Resume that loses nothing, atomic checkpoints, guarded numerics, bad data caught before training."""
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_uni
from conftest import ROOT, run_in_process, run_script, tiny_run_args
from datasets import load_data
from utils.checkpoint import TrainingDiverged, load_checkpoint, previous_checkpoint, save_checkpoint
from utils.config import load_config, validate
from utils.guard import TrainingGuard
from utils.run_setup import RunLog
from utils.signals import StopRequest

RESUMABLE = dict(total_iters=40, warmup_iters=5, ckpt_every=10, eval_every=20, image_size=64, crop_size=56)


def start(script: str, args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script)] + [str(a) for a in args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before writing its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)


def interrupt_after_first_checkpoint(script: str, args: list, run_dir: Path) -> None:
    """Start a run, SIGTERM it once its first checkpoint exists, and check that it saved and stopped."""
    process = start(script, args)
    wait_for(run_dir / "checkpoint.pth", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 128 + signal.SIGTERM


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def uninterrupted(synthetic_data, tiny_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run_script("train_uni.py", tiny_run_args(synthetic_data, tiny_weights, out, **RESUMABLE))
    return out / "run"


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_killed_and_resumed_run_is_bit_identical(uninterrupted, synthetic_data, tiny_weights, tmp_path, kill):
    process = start("train_uni.py", tiny_run_args(synthetic_data, tiny_weights, tmp_path, **RESUMABLE))
    wait_for(tmp_path / "run" / "checkpoint.pth", process)
    process.send_signal(kill)
    code = process.wait()
    assert code == (-signal.SIGKILL if kill == signal.SIGKILL else 128 + signal.SIGTERM)
    interrupted = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert 0 < interrupted["step"] < 40 and not interrupted["finished"]
    run_script("train_uni.py", ["--resume", tmp_path / "run"])
    assert_identical(tmp_path / "run" / "checkpoint.pth", uninterrupted / "checkpoint.pth")
    assert (tmp_path / "run" / "results.csv").read_text() == (uninterrupted / "results.csv").read_text()
    assert "resumed from" in (tmp_path / "run" / "log.txt").read_text()


def test_train_sep_resumes_at_the_class_and_step(synthetic_data, tiny_weights, tmp_path):
    args = lambda out: tiny_run_args(synthetic_data, tiny_weights, out, total_iters=30, warmup_iters=5, ckpt_every=10,
                                     image_size=64, crop_size=56)
    run_script("train_sep.py", args(tmp_path / "a"))
    process = start("train_sep.py", args(tmp_path / "b"))
    wait_for(tmp_path / "b" / "run" / "stripes" / "checkpoint.pth", process)  # second class under way
    process.kill()
    process.wait()
    assert load_checkpoint(tmp_path / "b" / "run" / "checker" / "checkpoint.pth")["finished"]
    run_script("train_sep.py", ["--resume", tmp_path / "b" / "run"])
    for name in ("checker", "stripes"):
        assert_identical(tmp_path / "a" / "run" / name / "checkpoint.pth", tmp_path / "b" / "run" / name / "checkpoint.pth")
    log = (tmp_path / "b" / "run" / "log.txt").read_text()
    assert "checker (finished earlier)" in log and "resumed from" in log


def test_interrupted_write_never_replaces_the_last_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"config": {}, "step": 10})
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"config": {}, "step": 20})
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["step"] == 10


def test_truncated_temporary_file_is_ignored_on_resume(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "checkpoint.pth.tmp").write_bytes((run_dir / "checkpoint.pth").read_bytes()[:1000])
    run_script("train_uni.py", ["--resume", run_dir])
    assert_identical(run_dir / "checkpoint.pth", uninterrupted / "checkpoint.pth")


def test_resume_refuses_to_change_the_recipe_and_names_missing_runs(uninterrupted, tmp_path, capsys):
    result = run_in_process(train_uni, ["--resume", uninterrupted, "--total_iters", "99"], capsys)
    assert result.returncode != 0 and "--total_iters cannot change when resuming" in result.stderr
    result = run_in_process(train_uni, ["--resume", tmp_path / "nope"], capsys)
    assert result.returncode != 0 and str(tmp_path / "nope" / "config.yaml") in result.stderr


def _in_process_cfg(data: Path, weights: Path, **overrides) -> dict:
    cfg = load_config(ROOT / "configs" / "mvtec_uni.yaml")
    cfg.update(dataset="folder", data_path=str(data), encoder="dinov2_vit_tiny_14", encoder_weights=str(weights),
               image_size=128, crop_size=112, batch_size=8, total_iters=30, warmup_iters=5, num_workers=0,
               device="cpu", eval_every=0, ckpt_every=10, classes=["stripes"])
    cfg.update(overrides)
    return validate(cfg)


def _train_with_nan_at(steps: set, cfg: dict, run_dir: Path, monkeypatch):
    real_loss = train_uni.global_cosine_hm
    calls = []

    def loss_with_nans(en, de, p, factor):
        calls.append(1)
        loss = real_loss(en, de, p, factor)
        return loss * float("nan") if len(calls) in steps else loss
    monkeypatch.setattr(train_uni, "global_cosine_hm", loss_with_nans)
    run_dir.mkdir()
    train_set, test_sets = load_data(cfg, cfg["classes"])
    return train_uni.train(cfg, train_set, test_sets, run_dir, RunLog(run_dir), torch.device("cpu"))


def test_non_finite_steps_are_skipped_and_logged(synthetic_data, tiny_weights, tmp_path, monkeypatch):
    cfg = _in_process_cfg(synthetic_data, tiny_weights)
    _train_with_nan_at({3, 4}, cfg, tmp_path / "run", monkeypatch)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "step 3: bad (loss nan, update skipped); batch: " in log and "step 4: bad" in log
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] == 30 and checkpoint["reshuffles"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_consecutive_bad_steps_roll_back_and_reshuffle(synthetic_data, tiny_weights, tmp_path, monkeypatch):
    cfg = _in_process_cfg(synthetic_data, tiny_weights, max_bad_steps=3)
    _train_with_nan_at({12, 13, 14}, cfg, tmp_path / "run", monkeypatch)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "step 14: diverged" in log and "rolled back to step 10" in log
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] == 30 and checkpoint["reshuffles"] == 1


def test_divergence_before_any_checkpoint_is_a_clear_error(synthetic_data, tiny_weights, tmp_path, monkeypatch):
    cfg = _in_process_cfg(synthetic_data, tiny_weights, max_bad_steps=2)
    with pytest.raises(TrainingDiverged, match="before the first checkpoint"):
        _train_with_nan_at({1, 2}, cfg, tmp_path / "run", monkeypatch)


def test_nan_images_change_no_weight(tiny_weights):
    cfg = _in_process_cfg(Path("."), tiny_weights)
    torch.manual_seed(0)
    model = train_uni.build_model(cfg).train()
    optimizer = train_uni.build_optimizer(model, cfg)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    loss, finite, _ = train_uni.train_step(model, optimizer, torch.full((2, 3, 56, 56), float("nan")), 5, [1e-3], cfg)
    assert not finite and loss != loss
    assert all(torch.equal(before[k], v) for k, v in model.trainable_state_dict().items())
    assert not optimizer.state


def test_guard_detects_spikes_against_the_running_median():
    guard = TrainingGuard(max_bad_steps=2, spike_factor=5.0, min_history=5)
    assert [guard.check(0.05, True) for _ in range(5)] == ["ok"] * 5
    assert guard.check(0.3, True) == "spike"
    assert guard.check(0.2, True) == "ok"
    assert guard.check(float("nan"), False) == "bad" and guard.check(float("nan"), False) == "diverged"


@pytest.mark.parametrize("damage,culprit", [
    (lambda d: (d / "stripes" / "train" / "good" / "003.png").write_bytes(b"garbage"), "train/good/003.png"),
    (lambda d: (d / "stripes" / "test" / "hole" / "001.png").write_bytes(b""), "test/hole/001.png"),
    (lambda d: __import__("PIL.Image").Image.new("L", (64, 64)).save(d / "checker" / "ground_truth" / "blob" / "002_mask.png"),
     "ground_truth/blob/002_mask.png"),
    (lambda d: shutil.rmtree(d / "checker" / "test" / "good"), "checker/test/good"),
    (lambda d: [p.unlink() for p in (d / "checker" / "train" / "good").iterdir()], "checker/train/good"),
])
def test_bad_datasets_fail_before_training_naming_the_file(synthetic_data, tiny_weights, tmp_path, damage, culprit,
                                                          capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    damage(data)
    result = run_in_process(train_uni, tiny_run_args(data, tiny_weights, tmp_path / "out"), capsys)
    assert result.returncode != 0 and culprit in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_when_asked(synthetic_data, tiny_weights, tmp_path, capsys):
    args = tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=3, warmup_iters=1, classes="stripes")
    assert run_in_process(train_uni, args, capsys).returncode == 0
    first = (tmp_path / "run" / "log.txt").read_text()
    assert run_in_process(train_uni, args, capsys).returncode != 0
    assert (tmp_path / "run" / "log.txt").read_text() == first
    assert run_in_process(train_uni, args + ["--overwrite"], capsys).returncode == 0
    assert (tmp_path / "run" / "checkpoint.pth").is_file()


def test_strong_augmentation_resumes_bit_identically_with_any_workers(synthetic_data, tiny_weights, tmp_path,
                                                                       monkeypatch):
    """A run stopped at step 2 (as by SIGTERM) and resumed with 2 data-loader workers ends with the weights of
    an uninterrupted run without workers: every augmentation draw is a function of (seed, step). (Weights
    only: evaluation is skipped.)"""
    cfg = _in_process_cfg(synthetic_data, tiny_weights, train_augment="strong", image_size=64, crop_size=56,
                          total_iters=4, warmup_iters=1, ckpt_every=0, batch_size=4)
    train_set, test_sets = load_data(cfg, cfg["classes"])
    monkeypatch.setattr(train_uni, "evaluate_on_main", lambda *args: None)

    def run(name: str, resume=None, **overrides):
        (tmp_path / name).mkdir(exist_ok=True)
        train_uni.train({**cfg, **overrides}, train_set, test_sets, tmp_path / name, RunLog(tmp_path / name),
                        torch.device("cpu"), resume)
    run("straight")
    steps = iter(range(1, 100))
    monkeypatch.setattr(StopRequest, "requested", lambda self: next(steps) == 2)
    with pytest.raises(SystemExit):
        run("resumed")
    monkeypatch.setattr(StopRequest, "requested", lambda self: False)
    checkpoint = previous_checkpoint(tmp_path / "resumed" / "checkpoint.pth")
    assert checkpoint["step"] == 2
    run("resumed", checkpoint, num_workers=2)
    assert_identical(tmp_path / "resumed" / "checkpoint.pth", tmp_path / "straight" / "checkpoint.pth")
