"""The structure that makes ablations cheap: inherited configs, defaults for keys an old run lacks,
and encoders with other patch sizes through the same code path."""
from pathlib import Path

import pytest
import torch
import yaml

import train_uni
from conftest import ROOT, meta_state_dict, run_in_process, run_script, tiny_run_args
from test_reliability import interrupt_after_first_checkpoint
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import DEFAULTS, ConfigError, load_config, parse_args, validate

SETTINGS = ["mvtec_uni", "mvtec_sep", "visa_uni", "visa_sep", "realiad_uni", "realiad_sep", "mpdd_sep"]


@pytest.mark.parametrize("name", SETTINGS)
def test_each_setting_resolves_to_its_old_flat_config(name):
    flat = yaml.safe_load((ROOT / "tests" / "legacy_configs" / f"{name}.yaml").read_text())
    resolved = validate(load_config(ROOT / "configs" / f"{name}.yaml"), name, lambda _: None)
    assert {k: resolved[k] for k in flat} == flat           # every old key keeps its value (auto resolved)
    assert {k: v for k, v in resolved.items() if k not in flat} == {k: DEFAULTS[k] for k in set(DEFAULTS) - set(flat)}


def test_settings_hold_only_what_differs():
    for name in SETTINGS:
        own = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        assert "_base_" in own and len(own) <= 6, name


def test_chain_of_parents_and_command_line_on_top(tmp_path):
    (tmp_path / "a.yaml").write_text(f"_base_: {ROOT / 'configs' / 'visa_sep.yaml'}\nseed: 5\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\ndropout: 0.3\n")
    cfg, _ = parse_args(["--config", str(tmp_path / "b.yaml"), "--dropout", "0.1"], "", "")
    assert (cfg["seed"], cfg["dropout"], cfg["dataset"], cfg["eps"], cfg["total_iters"]) == (5, 0.1, "visa", 1e-8, 5000)
    assert set(cfg) == set(DEFAULTS)


@pytest.mark.parametrize("files,message", [
    ({"a.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: a.yaml\n"}, "loops back"),
    ({"a.yaml": "_base_: nowhere.yaml\n"}, "parent config _base_: nowhere.yaml not found"),
    ({"a.yaml": "_base_: b.yaml\n", "b.yaml": "totl_iters: 3\n"}, "b.yaml: unknown config key 'totl_iters'; did you mean 'total_iters'"),
])
def test_broken_chains_are_one_line_errors(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "a.yaml")


def _drop_key_from_saved_configs(run_dir: Path, key: str) -> None:
    """What a run written before `key` existed looks like."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    del config[key]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    checkpoint = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    del checkpoint["config"][key]
    torch.save(checkpoint, run_dir / "checkpoint.pth")


def test_old_run_without_a_key_resumes_and_evaluates(synthetic_data, tiny_weights, tmp_path):
    args = tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=30, warmup_iters=5, ckpt_every=5,
                         classes="stripes")
    interrupt_after_first_checkpoint("train_uni.py", args, tmp_path / "run")
    _drop_key_from_saved_configs(tmp_path / "run", "attn_eps")
    run_script("train_uni.py", ["--resume", tmp_path / "run"])
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "resumed from" in log and "has no attn_eps; using the default" in log
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["config"]["attn_eps"] == 0.0

    _drop_key_from_saved_configs(tmp_path / "run", "map_sigma")
    result = run_script("evaluate.py", ["--checkpoint", tmp_path / "run" / "checkpoint.pth", "--out", tmp_path / "ev"])
    assert "has no map_sigma; using the default of configs/base.yaml: map_sigma=4.0" in result.stdout
    assert (tmp_path / "ev" / "results.csv").read_text() == (tmp_path / "run" / "results.csv").read_text()


@pytest.fixture(scope="module")
def patch16_weights(tmp_path_factory) -> Path:
    """`dinov2_vit_tiny_16` in Meta's layout: 16-pixel patches, a 32 x 32 position grid."""
    path = tmp_path_factory.mktemp("weights16") / "tiny16.pth"
    torch.save(meta_state_dict(64, 10, 0, torch.Generator().manual_seed(1), 0.3, patch=16, grid=32), path)
    return path


def test_encoder_with_16_pixel_patches_trains_through_the_same_path(synthetic_data, patch16_weights, tmp_path):
    run_script("train_uni.py", tiny_run_args(synthetic_data, patch16_weights, tmp_path, encoder="dinov2_vit_tiny_16",
                                             total_iters=6, warmup_iters=2, crop_size=112, classes="stripes"))
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    model = model_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        en, de = model(torch.randn(1, 3, 112, 112))
    assert [tuple(m.shape) for m in en + de] == [(1, 64, 7, 7)] * 4  # 112 / 16 = 7 patches a side
    assert (tmp_path / "run" / "results.csv").is_file()


def test_crop_not_divisible_by_the_patch_size_is_one_line(synthetic_data, patch16_weights, tmp_path, capsys):
    result = run_in_process(train_uni, tiny_run_args(synthetic_data, patch16_weights, tmp_path,
                                                     encoder="dinov2_vit_tiny_16", crop_size=112 + 14), capsys)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "crop_size must be a multiple of the patch size 16 of encoder 'dinov2_vit_tiny_16', got 126" in result.stderr
