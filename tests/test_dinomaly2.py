"""Dinomaly2 as switches: each computes what its name says (against direct computations written here),
a v2 run detects synthetic defects and repeats exactly, and few-shot runs draw, save and reuse their
images, also when they do not fill a batch."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models
from conftest import ROOT, encoder_layers, run_script, tiny_run_args
from datasets.fewshot import choose_shots
from datasets.transforms import strong_transform
from test_train_e2e import read_table
from train_uni import base_learning_rates, build_optimizer, train_step
from utils.config import DEFAULTS, ConfigError, load_config, validate
from utils.optim import GroupSchedule, warmup_cosine_schedule

V2 = validate(load_config(ROOT / "configs" / "dinomaly2" / "mvtec_uni.yaml"), "v2", lambda _: None)


def tiny_model(**overrides) -> models.Dinomaly:
    cfg = {**DEFAULTS, "encoder": "dinov2reg_vit_tiny_14", "encoder_weights": "random", **overrides}
    with pytest.warns(UserWarning):
        return models.build_model(cfg)


def test_recentering_against_a_direct_computation_and_only_on_the_targets():
    torch.manual_seed(0)
    model = tiny_model(recenter=True).eval()
    plain = tiny_model()
    plain.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        en, de = model(images)
        plain_en, plain_de = plain.eval()(images)
        layers = encoder_layers(model.encoder, images, 10)[2:10]
    for g, group in enumerate(([0, 1, 2, 3], [4, 5, 6, 7])):
        mean = torch.stack([layers[i] for i in group]).mean(0)  # [CLS, 4 registers, 16 patches]
        centred = mean[:, 5:] - mean[:, :1]
        mu = centred.mean(-1, keepdim=True)
        var = ((centred - mu) ** 2).mean(-1, keepdim=True)
        want = (centred - mu) / torch.sqrt(var + 1e-8)
        torch.testing.assert_close(en[g], want.transpose(1, 2).reshape(2, 64, 4, 4))
        assert torch.equal(de[g], plain_de[g])  # the bottleneck input and the decoder are untouched
        assert not torch.allclose(en[g], plain_en[g])


def test_two_stage_bottleneck_drops_where_the_released_code_drops():
    torch.manual_seed(0)
    bottleneck = tiny_model(bottleneck="two_stage", bottleneck_width=16, dropout=0.4).bottleneck.train()
    assert bottleneck.reduce.weight.shape == (16, 64) and bottleneck.fc1.weight.shape == (256, 16)
    x = torch.randn(3, 7, 64)
    torch.manual_seed(5)
    got = bottleneck(x)
    torch.manual_seed(5)
    first = F.dropout(F.linear(x, bottleneck.reduce.weight, bottleneck.reduce.bias), 0.4)  # no input dropout
    hidden = F.dropout(F.gelu(F.linear(first, bottleneck.fc1.weight, bottleneck.fc1.bias)), 0.4)
    torch.testing.assert_close(got, F.dropout(F.linear(hidden, bottleneck.fc2.weight, bottleneck.fc2.bias), 0.4))


def test_each_groups_rate_follows_its_own_base():
    bases = base_learning_rates(V2)
    assert bases == [2e-4, 2e-3]
    schedule = GroupSchedule(V2, bases)
    for step, factor in ((0, 0.0), (50, 0.5), (99, 0.99), (100, 1.0), (20000, 1.0), (V2["total_iters"] - 1, 1.0)):
        assert schedule(step) == pytest.approx([2e-4 * factor, 2e-3 * factor], rel=1e-12, abs=0), step
    decaying = GroupSchedule({**V2, "final_lr": 2e-4}, bases)  # ratio 0.1
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (20000 - 100) / (40000 - 100)))
    assert decaying(20000) == pytest.approx([2e-4 * cosine, 2e-3 * cosine], rel=1e-12)
    assert decaying(39999) == pytest.approx([2e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39899 / 39900))),
                                             2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39899 / 39900)))])
    v1 = GroupSchedule(DEFAULTS, base_learning_rates(DEFAULTS))
    recipe = warmup_cosine_schedule(2e-3, 2e-4, 10000, 100)
    assert all(v1(step) == [float(recipe[step])] for step in (0, 50, 99, 100, 5000, 9999))
    assert v1(99) == [2e-3]  # v1's linspace warm-up is at the base one step earlier


def test_the_first_layers_group_and_amsgrad_reach_the_optimizer():
    torch.manual_seed(0)
    cfg = {**DEFAULTS, **{k: V2[k] for k in ("recenter", "bottleneck", "bottleneck_width", "bottleneck_first_lr",
                                              "lr_schedule", "final_lr", "amsgrad")}, "encoder": "dinov2reg_vit_tiny_14",
           "encoder_weights": "random"}
    with pytest.warns(UserWarning):
        model = models.build_model(cfg).train()
    optimizer = build_optimizer(model, cfg)
    first, rest = optimizer.param_groups
    assert [p for p in first["params"]] == list(model.bottleneck.reduce.parameters())
    assert len(rest["params"]) == len(model.trainable_parameters()) - 2 and not first["amsgrad"]
    train_step(model, optimizer, torch.randn(2, 3, 56, 56), 50, GroupSchedule(cfg, base_learning_rates(cfg))(50), cfg)
    assert (first["lr"], rest["lr"]) == pytest.approx((1e-4, 1e-3))
    assert "max_exp_avg_sq" not in optimizer.state[model.bottleneck.reduce.weight]
    for bad in ({"bottleneck_first_lr": 1e-4}, {"recenter": True, "fuse_mode": "concat"},
                {"train_augment": "strong", "cache_features": "memory"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            validate({**DEFAULTS, **bad}, "cfg", lambda _: None)


@pytest.fixture(scope="module")
def v2_run(synthetic_data, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("v2")
    run_script("train_uni.py", ["--config", ROOT / "configs" / "dinomaly2" / "mvtec_uni.yaml"] + tiny_run_args(
        synthetic_data, tiny_weights, out, total_iters=150, hm_ramp_iters=50, bottleneck_first_lr=2e-4))
    return out / "run"


def test_a_v2_run_detects_synthetic_defects(v2_run):
    table = read_table(v2_run / "results.csv")
    assert table["mean"]["I-AUROC"] >= 90.0 and table["mean"]["P-AUROC"] >= 80.0, table
    saved = validate(load_config(v2_run / "config.yaml"), "saved", lambda _: None)
    assert (saved["recenter"], saved["bottleneck"], saved["lr_schedule"], saved["amsgrad"]) == (True, "two_stage",
                                                                                               "v2", False)


def test_a_v2_run_repeats_exactly(synthetic_data, tiny_weights, tmp_path):
    weights = []
    for name in ("a", "b"):
        run_script("train_uni.py", ["--config", ROOT / "configs" / "dinomaly2" / "mvtec_uni.yaml"] + tiny_run_args(
            synthetic_data, tiny_weights, tmp_path, total_iters=8, warmup_iters=2, run_name=name))
        weights.append(torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_shots_are_the_authors_draw():
    images = {name: [f"/d/{name}/{i:03d}.png" for i in range(n)] for name, n in (("b", 9), ("a", 12))}
    rng = random.Random(1)
    want = {name: rng.sample(sorted(paths), 3) for name, paths in images.items()}  # classes in the given order
    assert choose_shots(images, 3, 1) == want == choose_shots(images, 3, 1)
    assert choose_shots(images, 3, 2) != want


def test_one_shot_runs_with_fewer_images_than_a_batch_and_its_list_is_reused(synthetic_data, tiny_weights, tmp_path):
    args = tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=3, warmup_iters=1, shots=1,
                         train_augment="strong", batch_size=8)  # 2 classes x 1 shot for a batch of 8
    run_script("train_uni.py", args)
    listed = (tmp_path / "run" / "shot_list.txt").read_text().splitlines()
    assert len(listed) == 2 and {line.split("\t")[0] for line in listed} == {"checker", "stripes"}
    assert "train     1" in (tmp_path / "run" / "log.txt").read_text()
    again = tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=3, warmup_iters=1, run_name="again",
                          shot_list=tmp_path / "run" / "shot_list.txt")
    run_script("train_uni.py", again)
    assert (tmp_path / "again" / "shot_list.txt").read_text().splitlines() == listed


def test_strong_augmentation_keeps_area_aspect_and_quarter_turns():
    """Each output pixel's colour encodes the source position (red = column, green = row), which gives
    back the crop box and the turn or flip of every draw."""
    size, crop = 256, 224
    ramp = np.arange(size, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                                      np.zeros((size, size), np.uint8)], axis=-1))
    transform = strong_transform(size, crop, (0, 0, 0), (1 / 255, 1 / 255, 1 / 255))  # back to 0..255
    torch.manual_seed(0)
    layouts = set()
    for _ in range(200):
        out = transform(image)
        column, row = out[0], out[1]
        corners = [(float(column[i, j]), float(row[i, j])) for i, j in ((0, 0), (0, -1), (-1, 0))]
        # a quarter turn or a flip: along each output axis only one of column and row changes
        across, down = np.subtract(corners[1], corners[0]), np.subtract(corners[2], corners[0])
        assert min(abs(across[0]), abs(across[1])) < 2 and min(abs(down[0]), abs(down[1])) < 2
        width, height = (abs(across[0]) + abs(down[0])) + 1, (abs(across[1]) + abs(down[1])) + 1
        assert (width * height) / size ** 2 == pytest.approx((crop / size) ** 2, rel=0.03)
        assert 0.95 - 0.02 <= width / height <= 1.05 + 0.02
        layouts.add((bool(abs(across[0]) > abs(across[1])), bool(np.sign(across.sum()) > 0),
                     bool(np.sign(down.sum()) > 0)))
    assert len(layouts) == 8  # 4 turns x 2 flips: every orientation of the square appears
