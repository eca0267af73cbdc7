"""Mixed precision, caches and multi-process training: faster, computing the same thing."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import train_uni
from conftest import ROOT, run_in_process, run_script, tiny_run_args
from datasets import build_train_set
from datasets.caches import FeatureCache, attach_image_cache
from models import build_model
from utils.config import load_config, validate
from utils.device import autocast, cpu_bf16_native


def _cfg(data, weights, **overrides) -> dict:
    cfg = load_config(ROOT / "configs" / "mvtec_uni.yaml")
    cfg.update(dataset="folder", data_path=str(data), encoder="dinov2_vit_tiny_14", encoder_weights=str(weights),
               image_size=128, crop_size=112, batch_size=4, num_workers=0, device="cpu", classes=["stripes"])
    cfg.update(overrides)
    return validate(cfg)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_two_gloo_processes_equal_one_process(synthetic_data, tiny_weights, tmp_path):
    args = tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=6, warmup_iters=2, batch_size=4,
                         dropout=0.0, hm_ramp_iters=3)
    run_script("train_uni.py", args + ["--run_name", "single"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_uni.py")] + args + ["--run_name", "ddp"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    single, ddp = _weights(tmp_path / "single" / "checkpoint.pth"), _weights(tmp_path / "ddp" / "checkpoint.pth")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5)
    assert result.stdout.count("results written to") == 1  # only rank 0 reports and writes


@pytest.mark.skipif(not cpu_bf16_native(), reason="bf16 is emulated on this CPU (no AVX-512 BF16/AMX), about 20x "
                    "slower; training falls back to fp32 there (tests/test_usability.py)")
def test_bf16_on_cpu_detects_synthetic_defects(synthetic_data, tiny_weights, tmp_path):
    run_script("train_uni.py", tiny_run_args(synthetic_data, tiny_weights, tmp_path, precision="bf16",
                                             cache_features="memory", allow_emulated_bf16="true"))
    with open(tmp_path / "run" / "results.csv") as f:
        mean = {r["class"]: r for r in csv.DictReader(f)}["mean"]
    assert float(mean["I-AUROC"]) >= 90.0, mean
    assert not (tmp_path / "run" / "feature_cache").exists()


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_image_cache_gives_bit_identical_inputs(synthetic_data, tiny_weights, tmp_path, mode):
    cfg = _cfg(synthetic_data, tiny_weights)
    plain = build_train_set(cfg, ["stripes", "checker"])
    cached = build_train_set(cfg, ["stripes", "checker"])
    attach_image_cache(cached, mode, tmp_path / "cache", cfg["image_size"])
    for i in range(0, len(plain), 7):
        assert torch.equal(plain[i][0], cached[i][0])
    if mode == "disk":
        again = build_train_set(cfg, ["stripes", "checker"])
        attach_image_cache(again, mode, tmp_path / "cache", cfg["image_size"])  # reuses the file
        assert len(list((tmp_path / "cache").iterdir())) == 1 and torch.equal(again[5][0], plain[5][0])


@pytest.mark.parametrize("precision,mode", [("fp32", "memory"), ("bf16", "disk")])
def test_feature_cache_holds_the_encoder_outputs(synthetic_data, tiny_weights, tmp_path, precision, mode):
    cfg = _cfg(synthetic_data, tiny_weights, precision=precision)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    train_set = build_train_set(cfg, ["stripes"])
    cache = FeatureCache(model, train_set, cfg, torch.device("cpu"), mode, tmp_path / "features")
    for i in (0, 5, len(train_set) - 1):
        (fused, groups), index = cache[i]
        with autocast(torch.device("cpu"), precision):
            want_fused, want_groups = model.encode(train_set[i][0][None])
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # stored in the compute dtype
        assert index == i and fused.dtype == dtype and all(g.dtype == dtype for g in groups)
        torch.testing.assert_close(fused, want_fused[0].to(dtype), rtol=1e-5, atol=1e-5)
        for got, want in zip(groups, want_groups):
            torch.testing.assert_close(got, want[0].to(dtype), rtol=1e-5, atol=1e-5)
        with autocast(torch.device("cpu"), precision):  # as a training step consumes the cache
            en, de = model(((fused[None], [g[None] for g in groups])))
        assert torch.equal(en[0][0], groups[0])


def test_training_with_cached_features_matches_recomputing_them(synthetic_data, tiny_weights, tmp_path):
    args = tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=8, warmup_iters=2, classes="stripes")
    run_script("train_uni.py", args + ["--run_name", "plain"])
    run_script("train_uni.py", args + ["--run_name", "cached", "--cache_features", "memory", "--image_cache", "memory"])
    plain, cached = _weights(tmp_path / "plain" / "checkpoint.pth"), _weights(tmp_path / "cached" / "checkpoint.pth")
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-5, atol=1e-6)


def test_class_balanced_sampler_works_with_cached_features(synthetic_data, tiny_weights, tmp_path):
    run_script("train_uni.py", tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=4, warmup_iters=1,
                                             sampler="class_balanced", cache_features="memory"))
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["step"] == 4


def test_fp16_needs_cuda(synthetic_data, tiny_weights, tmp_path, capsys):
    result = run_in_process(train_uni, tiny_run_args(synthetic_data, tiny_weights, tmp_path, precision="fp16"), capsys)
    assert result.returncode != 0 and "fp16 needs a CUDA device" in result.stderr
