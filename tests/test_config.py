from pathlib import Path

import pytest
import yaml

from utils.config import SCHEMA, ConfigError, load_config, parse_args, validate

ROOT = Path(__file__).resolve().parents[1]
UNI = str(ROOT / "configs" / "mvtec_uni.yaml")


def test_configs_hold_the_recipe():
    uni = load_config(UNI)
    sep = load_config(ROOT / "configs" / "mvtec_sep.yaml")
    assert set(uni) == set(SCHEMA) == set(sep)
    assert uni["encoder"] == "dinov2reg_vit_base_14" and uni["target_layers"] == "auto"
    assert validate(uni, "uni", lambda _: None)["target_layers"] == list(range(2, 10))
    assert (uni["image_size"], uni["crop_size"], uni["batch_size"]) == (448, 392, 16)
    assert (uni["lr"], uni["final_lr"], uni["weight_decay"], uni["eps"]) == (2e-3, 2e-4, 1e-4, 1e-10)
    assert (uni["total_iters"], uni["warmup_iters"], uni["grad_clip"], uni["dropout"]) == (10000, 100, 0.1, 0.2)
    assert (sep["total_iters"], sep["eps"]) == (5000, 1e-8)
    assert (uni["max_ratio"], uni["map_size"], uni["map_sigma"], uni["gt_threshold"]) == (0.01, 256, 4.0, 0.0)


def test_command_line_overrides_every_type():
    cfg, _ = parse_args(["--total_iters", "200", "--lr", "1e-4", "--encoder", "dinov2reg_vit_small_14",
                         "--target_layers", "2,3,4,5", "--fuse_layer_encoder", "[[0, 1], [2, 3]]",
                         "--classes", "bottle,cable", "--encoder_weights", "null", "--device", "cpu"], UNI, "")
    assert cfg["total_iters"] == 200 and cfg["lr"] == 1e-4 and cfg["target_layers"] == [2, 3, 4, 5]
    assert cfg["fuse_layer_encoder"] == [[0, 1], [2, 3]] and cfg["classes"] == ["bottle", "cable"]
    assert cfg["encoder_weights"] is None and cfg["device"] == "cpu"
    cfg, _ = parse_args(["--target_layers", "auto", "--encoder", "dinov2reg_vit_large_14"], UNI, "")
    assert cfg["target_layers"] == [4, 6, 8, 10, 12, 14, 16, 18]


@pytest.mark.parametrize("argv,message", [
    (["--total_iters", "many"], "'total_iters' must be int"),
    (["--dropout", "1.5"], "'dropout' must be in [0, 1)"),
    (["--attention", "softmx"], "'attention' must be one of linear, softmax"),
    (["--crop_size", "400"], "multiple of the patch size 14"),
    (["--crop_size", "476"], "crop_size 476 is larger than image_size 448"),
    (["--batch_size", "0"], "'batch_size' must be > 0"),
    (["--warmup_iters", "20000"], "warmup_iters (20000) must be below total_iters"),
    (["--masks", "none", "--dataset", "manta"], "masks 'none' needs a dataset in the MVTec layout; manta"),
    (["--masks", "no"], "'masks' must be one of required, none"),
    (["--encoder", "dinov2reg_vit_large_14", "--target_layers", "4,30"], "indices in 0..23 (the encoder has 24 blocks)"),
    (["--target_layers", "5,4,6"], "target_layers [5, 4, 6] must be strictly increasing"),
    (["--fuse_layer_decoder", "[[0,1,2,3],[4,5,6,8]]"], "indices in 0..7 (the 8 decoder blocks)"),
    (["--fuse_layer_decoder", "[[0,1,2,3]]"], "the same number of groups, got 2 and 1"),
    (["--fuse_mode", "concat"], "fuse_mode concat (layer-to-cat-layer) takes one group"),
    (["--recenter", "true", "--fuse_mode", "concat", "--fuse_layer_encoder", "[[0,1]]", "--fuse_layer_decoder", "[[7]]"],
     "recenter works on averaged groups"),
    (["--attention", "conv", "--neighbor_mask", "3"], "neighbor_mask applies to attention"),
    (["--attention", "conv", "--conv_kernel", "4"], "conv_kernel must be odd"),
])
def test_bad_values_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_args(argv, UNI, "")
    assert message in str(error.value)


def test_unknown_key_in_file_suggests_closest(tmp_path):
    cfg = load_config(UNI)
    cfg["total_iter"] = 5
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="unknown config key 'total_iter'; did you mean 'total_iters'"):
        parse_args(["--config", str(path)], UNI, "")


def test_unknown_command_line_option_suggests_closest(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--learning_rate", "1"], UNI, "")
    with pytest.raises(SystemExit):
        parse_args(["--totl_iters", "1"], UNI, "")
    assert "did you mean '--total_iters'" in capsys.readouterr().err


def test_missing_key_gets_its_default_with_a_note_and_missing_file_fails(tmp_path, capsys):
    path = tmp_path / "partial.yaml"
    path.write_text("dataset: visa\ntotal_iters: 700\n")
    cfg, _ = parse_args(["--config", str(path)], UNI, "")
    assert cfg == {**load_config(ROOT / "configs" / "base.yaml"), "dataset": "visa", "total_iters": 700,
                   "target_layers": list(range(2, 10))}  # auto, resolved for the default ViT-B
    note = capsys.readouterr().out
    assert "has no data_path" in note and "data_path='../mvtec_anomaly_detection'" in note
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", str(tmp_path / "none.yaml")], UNI, "")
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", str(tmp_path / "none.yaml")], UNI, "")
