"""DINOv3: every registered size loads strictly from Meta's file layout, and what it computes (RoPE, the
masked qkv bias, LayerScale, the FFNs) is pinned against direct computations written here from
DINOv3's definition, on square and non-square grids."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import models
import train_uni
from conftest import ROOT, run_in_process, run_script, tiny_run_args
from models import registry
from models.dinov3 import apply_rope
from utils.config import DEFAULTS

D, HEADS, DEPTH, PATCH, STORAGE = 48, 2, 2, 16, 4
HEAD_DIM = D // HEADS
PERIODS = torch.tensor([1.0, 1.3359375, 2.375, 4.21875, 17.75, 75.0])  # HEAD_DIM / 4 of them, bf16-like
# (registered name, FFN, hidden width of this D as Meta's code sizes it, qkv bias, local class norm in the file)
SIZES = [("dinov3_vit_small_16", "mlp", 4 * D, True, False),
         ("dinov3_vit_small_plus_16", "swiglu", 192, True, False),     # int(6 D * 2/3) = 192, a multiple of 8
         ("dinov3_vit_base_16", "mlp", 4 * D, True, False),
         ("dinov3_vit_large_16", "mlp", 4 * D, True, False),
         ("dinov3_vit_huge_plus_16", "swiglu", 192, True, False),
         ("dinov3_vit_7b_16", "swiglu", 128, False, True),             # int(3 D * 2/3) = 96, aligned up to 64
         ("dinov3sat_vit_large_16", "mlp", 4 * D, True, True)]         # its local class norm is dropped


def rand(gen, *shape, std=0.05):
    return torch.randn(*shape, generator=gen) * std


def meta_file(ffn: str, hidden: int, qkv_bias: bool, local_norm: bool, gen, depth: int = DEPTH, dim: int = D,
              periods: torch.Tensor = PERIODS) -> dict:
    """A DINOv3 checkpoint key by key as Meta's files hold it (flat; rope periods and bias masks as buffers)."""
    sd = {"cls_token": rand(gen, 1, 1, dim), "storage_tokens": rand(gen, 1, STORAGE, dim),
          "mask_token": rand(gen, 1, dim), "patch_embed.proj.weight": rand(gen, dim, 3, PATCH, PATCH),
          "patch_embed.proj.bias": rand(gen, dim), "rope_embed.periods": periods.clone(),
          "norm.weight": 1 + rand(gen, dim), "norm.bias": rand(gen, dim)}
    if local_norm:
        sd.update({"local_cls_norm.weight": 1 + rand(gen, dim), "local_cls_norm.bias": rand(gen, dim)})
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + rand(gen, dim), b + "norm1.bias": rand(gen, dim),
                   b + "attn.qkv.weight": rand(gen, 3 * dim, dim, std=dim ** -0.5),
                   b + "attn.proj.weight": rand(gen, dim, dim, std=dim ** -0.5), b + "attn.proj.bias": rand(gen, dim),
                   b + "ls1.gamma": 0.5 + rand(gen, dim), b + "ls2.gamma": 0.5 + rand(gen, dim),
                   b + "norm2.weight": 1 + rand(gen, dim), b + "norm2.bias": rand(gen, dim)})
        if qkv_bias:
            sd[b + "attn.qkv.bias"] = rand(gen, 3 * dim, std=0.5)
            sd[b + "attn.qkv.bias_mask"] = (torch.rand(3 * dim, generator=gen) > 0.4).float()
        layers = (("fc1", hidden, dim), ("fc2", dim, hidden)) if ffn == "mlp" else (
            ("w1", hidden, dim), ("w2", hidden, dim), ("w3", dim, hidden))
        for layer, out_width, in_width in layers:
            sd[f"{b}mlp.{layer}.weight"] = rand(gen, out_width, in_width, std=in_width ** -0.5)
            sd[f"{b}mlp.{layer}.bias"] = rand(gen, out_width)
    return sd


@pytest.fixture
def tiny(monkeypatch):
    """Shrink a registered DINOv3 size to D wide and DEPTH blocks, keeping its layout and options."""
    def shrink(name: str) -> str:
        spec = dataclasses.replace(registry.ENCODERS[name], embed_dim=D, depth=DEPTH, num_heads=HEADS)
        monkeypatch.setitem(registry.ENCODERS, name, spec)
        return name
    return shrink


def saved(tmp_path, sd: dict) -> str:
    path = tmp_path / "weights.pth"
    torch.save(sd, path)
    return str(path)


def loaded(name: str, sd: dict, tmp_path):
    return models.load_encoder(name, saved(tmp_path, sd), verbose=False).eval()


def test_registry_holds_metas_files_and_sizes():
    expected = {"dinov3_vit_small_16": (384, 12, 6, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
                "dinov3_vit_small_plus_16": (384, 12, 6, "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
                "dinov3_vit_base_16": (768, 12, 12, "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
                "dinov3_vit_large_16": (1024, 24, 16, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
                "dinov3_vit_huge_plus_16": (1280, 32, 20, "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
                "dinov3_vit_7b_16": (4096, 40, 32, "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"),
                "dinov3sat_vit_large_16": (1024, 24, 16, "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")}
    for name, (dim, depth, heads, file_name) in expected.items():
        spec = registry.ENCODERS[name]
        assert (spec.embed_dim, spec.depth, spec.num_heads, spec.file_name) == (dim, depth, heads, file_name), name
        assert spec.url is None and file_name.endswith(f"-{spec.sha256}.pth") and spec.patch_size == 16
    assert registry.ENCODERS["dinov3sat_vit_large_16"].mean == (0.430, 0.411, 0.296)
    # the real ViT-S: Meta's 188 keys, about 21M parameters
    state = registry.build_encoder("dinov3_vit_small_16").state_dict()
    assert len(state) == 188 and round(sum(v.numel() for v in state.values()) / 1e6) == 22


@pytest.mark.parametrize("name,ffn,hidden,qkv_bias,local_norm", SIZES)
def test_each_size_loads_metas_layout_strictly(name, ffn, hidden, qkv_bias, local_norm, tiny, tmp_path):
    tiny(name)
    sd = meta_file(ffn, hidden, qkv_bias, local_norm, torch.Generator().manual_seed(0))
    state = loaded(name, sd, tmp_path).state_dict()
    kept = {k: v for k, v in sd.items() if not (name.startswith("dinov3sat") and k.startswith("local_cls_norm."))}
    assert set(state) == set(kept)
    assert all(torch.equal(state[k], v) for k, v in kept.items())

    weight = "blocks.1.mlp.fc1.weight" if ffn == "mlp" else "blocks.1.mlp.w2.weight"
    for broken, message in ((lambda s: s.pop("rope_embed.periods"), r"missing keys \(1\): rope_embed.periods"),
                            (lambda s: s.__setitem__("blocks.0.attn.qkv.scale", torch.ones(1)),
                             r"unexpected keys \(1\): blocks.0.attn.qkv.scale"),
                            (lambda s: s.__setitem__(weight, torch.zeros(3, D)), rf"{weight}: file \(3, {D}\) vs model")):
        sd = meta_file(ffn, hidden, qkv_bias, local_norm, torch.Generator().manual_seed(0))
        broken(sd)
        with pytest.raises(registry.WeightsError, match=message):
            models.load_encoder(name, saved(tmp_path, sd), verbose=False)


def direct_rope(x: torch.Tensor, h: int, w: int, periods: torch.Tensor) -> torch.Tensor:
    """Rotate the last h*w tokens of x (B x heads x N x head_dim), token by token and channel by channel:
    the first quarter of the channels turns with the row coordinate, the second with the column one, the
    second half repeats the first; rotate-half pairs channel c with c + head_dim/2."""
    out = x.clone()
    n, half, quarter = x.shape[-1], x.shape[-1] // 2, x.shape[-1] // 4
    prefix = x.shape[-2] - h * w
    for t in range(h * w):
        i, j = divmod(t, w)
        coord = (2 * (i + 0.5) / h - 1, 2 * (j + 0.5) / w - 1)
        for c in range(n):
            k = c % half
            angle = 2 * math.pi * coord[k // quarter] / periods[k % quarter].item()
            partner = -x[..., prefix + t, c + half] if c < half else x[..., prefix + t, c - half]
            out[..., prefix + t, c] = x[..., prefix + t, c] * math.cos(angle) + partner * math.sin(angle)
    return out


def direct_block(x: torch.Tensor, sd: dict, b: str, h: int, w: int) -> torch.Tensor:
    """A DINOv3 block from its definition: LN eps 1e-5, qkv bias * mask, RoPE on patch q and k, LayerScale."""
    ln = lambda t, name: F.layer_norm(t, (D,), sd[b + name + ".weight"], sd[b + name + ".bias"], eps=1e-5)
    qkv = ln(x, "norm1") @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"] * sd[b + "attn.qkv.bias_mask"]
    heads = lambda t: t.reshape(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)
    q, k, v = (heads(t) for t in qkv.split(D, dim=-1))
    q, k = direct_rope(q, h, w, sd["rope_embed.periods"]), direct_rope(k, h, w, sd["rope_embed.periods"])
    attn = ((q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)).softmax(-1) @ v
    x = x + sd[b + "ls1.gamma"] * (attn.transpose(1, 2).reshape(x.shape) @ sd[b + "attn.proj.weight"].T
                                   + sd[b + "attn.proj.bias"])
    hidden = F.gelu(ln(x, "norm2") @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
    return x + sd[b + "ls2.gamma"] * (hidden @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"])


@pytest.mark.parametrize("height,width", [(64, 64), (48, 80)])
def test_tokens_rope_and_block_match_a_direct_computation(height, width, tiny, tmp_path):
    name = tiny("dinov3_vit_base_16")
    sd = meta_file("mlp", 4 * D, True, False, torch.Generator().manual_seed(1))
    encoder = loaded(name, sd, tmp_path)
    images = torch.randn(2, 3, height, width)
    h, w = height // PATCH, width // PATCH
    patches = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    want_tokens = torch.cat((sd["cls_token"].expand(2, -1, -1), sd["storage_tokens"].expand(2, -1, -1),
                             patches.flatten(2).transpose(1, 2)), dim=1)
    with torch.no_grad():
        tokens, rope = encoder.prepare_tokens(images)
        torch.testing.assert_close(tokens, want_tokens, rtol=1e-5, atol=1e-6)
        q = torch.randn(2, HEADS, 1 + STORAGE + h * w, HEAD_DIM)
        rotated = apply_rope(q, rope)
        assert torch.equal(rotated[:, :, :1 + STORAGE], q[:, :, :1 + STORAGE])  # prefix tokens untouched
        torch.testing.assert_close(rotated, direct_rope(q, h, w, PERIODS), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoder.blocks[0](tokens, rope), direct_block(tokens, sd, "blocks.0.", h, w),
                                   rtol=1e-4, atol=1e-5)


def test_the_files_periods_and_bias_mask_are_the_ones_used(tiny, tmp_path):
    name = tiny("dinov3_vit_small_16")
    gen = torch.Generator().manual_seed(2)
    sd = meta_file("mlp", 4 * D, True, False, gen)
    images = torch.randn(1, 3, 64, 48)

    def features(state: dict) -> torch.Tensor:
        encoder = loaded(name, state, tmp_path)
        with torch.no_grad():
            tokens, rope = encoder.prepare_tokens(images)
            return encoder.blocks[1](encoder.blocks[0](tokens, rope), rope)

    reference = features(sd)
    perturbed = features({**sd, "rope_embed.periods": PERIODS * 1.01})
    assert (perturbed - reference).abs().max() > 1e-3
    no_mask = {**sd, **{f"blocks.{i}.attn.qkv.bias_mask": torch.zeros(3 * D) for i in range(DEPTH)}}
    no_bias = {**sd, **{f"blocks.{i}.attn.qkv.bias": torch.zeros(3 * D) for i in range(DEPTH)}}
    torch.testing.assert_close(features(no_mask), features(no_bias), rtol=0, atol=0)  # a zero mask: zero bias
    assert (features(no_mask) - reference).abs().max() > 1e-3
    qkv = loaded(name, sd, tmp_path).blocks[0].attn.qkv
    x = torch.randn(3, D)
    torch.testing.assert_close(qkv(x), x @ sd["blocks.0.attn.qkv.weight"].T
                               + sd["blocks.0.attn.qkv.bias"] * sd["blocks.0.attn.qkv.bias_mask"])


def test_swiglu_and_the_7b_without_qkv_bias(tiny, tmp_path):
    name = tiny("dinov3_vit_7b_16")
    sd = meta_file("swiglu", 128, False, True, torch.Generator().manual_seed(3))
    block = loaded(name, sd, tmp_path).blocks[0]
    assert block.attn.qkv.bias is None and not hasattr(block.attn.qkv, "bias_mask")
    x = torch.randn(2, 5, D)
    w = lambda n: (sd[f"blocks.0.mlp.{n}.weight"], sd[f"blocks.0.mlp.{n}.bias"])
    want = F.linear(F.silu(F.linear(x, *w("w1"))) * F.linear(x, *w("w2")), *w("w3"))
    torch.testing.assert_close(block.mlp(x), want)


def test_a_training_model_gets_eval_features_from_its_encoder():
    cfg = {**DEFAULTS, "encoder": "dinov3_vit_tiny_16", "encoder_weights": "random"}
    with pytest.warns(UserWarning):
        model = models.build_model(cfg)
    images = torch.randn(2, 3, 64, 80)
    model.train()
    assert not model.encoder.training
    training_fused, training_groups = model.encode(images)
    model.eval()
    fused, groups = model.encode(images)
    assert torch.equal(training_fused, fused) and all(torch.equal(a, b) for a, b in zip(training_groups, groups))
    assert groups[0].shape == (2, 64, 4, 5)


def test_missing_gated_file_says_where_to_get_it_and_where_to_put_it(tmp_path):
    with pytest.raises(registry.WeightsError) as error:
        models.load_encoder("dinov3_vit_base_16", weights_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and registry.DINOV3_FORM in message and str(tmp_path) in message
    assert "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth" in message and "--encoder_weights" in message


def test_a_file_under_its_official_name_in_the_cache_is_found_and_checked(tiny, tmp_path, monkeypatch):
    name = tiny("dinov3_vit_base_16")
    spec = registry.ENCODERS[name]
    path = tmp_path / spec.file_name
    torch.save(meta_file("mlp", 4 * D, True, False, torch.Generator().manual_seed(4)), path)
    with pytest.raises(registry.WeightsError, match="sha256 mismatch"):  # the real file's prefix is 73cec8be
        models.load_encoder(name, weights_dir=str(tmp_path), verbose=False)
    monkeypatch.setitem(registry.ENCODERS, name, dataclasses.replace(spec, sha256=registry.sha256_of(path)[:8]))
    assert models.load_encoder(name, weights_dir=str(tmp_path), verbose=False).embed_dim == D


@pytest.fixture(scope="session")
def dinov3_weights(tmp_path_factory):
    """`dinov3_vit_tiny_16` (64 wide, 10 blocks) in Meta's layout, written key by key."""
    sd = meta_file("mlp", 256, True, False, torch.Generator().manual_seed(5), depth=10, dim=64,
                   periods=torch.logspace(0, 2, 8))  # 2 heads of 32 channels: 8 periods
    path = tmp_path_factory.mktemp("dinov3") / "tiny_dinov3.pth"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("script", ["train_uni.py", "train_sep.py"])
def test_a_tiny_dinov3_trains_through_both_scripts(script, synthetic_data, dinov3_weights, tmp_path):
    args = tiny_run_args(synthetic_data, dinov3_weights, tmp_path, encoder="dinov3_vit_tiny_16", total_iters=6,
                         warmup_iters=2, image_size=128, crop_size=112)
    run_script(script, args)
    results = (tmp_path / "run" / "results.csv").read_text()
    assert "mean" in results and "stripes" in results


def test_a_crop_off_the_16_pixel_grid_is_one_line_with_the_hint(synthetic_data, dinov3_weights, tmp_path, capsys):
    result = run_in_process(train_uni, tiny_run_args(synthetic_data, dinov3_weights, tmp_path,
                                                     encoder="dinov3_vit_tiny_16", crop_size=120), capsys)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--image_size 512 --crop_size 448" in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,dataset,encoder,layers", [
    ("mvtec_uni_vitb16", "mvtec", "dinov3_vit_base_16", list(range(2, 10))),
    ("mvtec_uni_vitl16", "mvtec", "dinov3_vit_large_16", list(range(4, 20, 2))),
    ("visa_uni_vitb16", "visa", "dinov3_vit_base_16", list(range(2, 10))),
    ("visa_uni_vitl16", "visa", "dinov3_vit_large_16", list(range(4, 20, 2)))])
def test_dinov3_settings_files(name, dataset, encoder, layers):
    from utils.config import load_config, validate
    cfg = validate(load_config(ROOT / "configs" / "dinov3" / f"{name}.yaml"), name, lambda _: None)
    assert (cfg["dataset"], cfg["encoder"], cfg["target_layers"]) == (dataset, encoder, layers)
    assert (cfg["image_size"], cfg["crop_size"], cfg["total_iters"], cfg["lr"]) == (512, 448, 10000, 2e-3)
