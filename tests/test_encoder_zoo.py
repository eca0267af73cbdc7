"""The foundation encoders of Table A4: each family's official file layout loads strictly through the
registry, and each architectural difference from DINOv2's ViT is pinned against a direct computation."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import models
from models import registry

D, DEPTH, HEADS, PATCH, GRID = 32, 2, 2, 16, 14


def rand(gen, *shape, std=0.05):
    return torch.randn(*shape, generator=gen) * std


def dino_v1_backbone(gen) -> dict:
    """DINO v1 / timm ViT key names (facebookresearch/dino vision_transformer.py), written out here."""
    sd = {"cls_token": rand(gen, 1, 1, D), "pos_embed": rand(gen, 1, GRID * GRID + 1, D),
          "patch_embed.proj.weight": rand(gen, D, 3, PATCH, PATCH), "patch_embed.proj.bias": rand(gen, D),
          "norm.weight": 1 + rand(gen, D), "norm.bias": rand(gen, D)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + rand(gen, D), b + "norm1.bias": rand(gen, D),
                   b + "attn.qkv.weight": rand(gen, 3 * D, D, std=D ** -0.5), b + "attn.qkv.bias": rand(gen, 3 * D),
                   b + "attn.proj.weight": rand(gen, D, D, std=D ** -0.5), b + "attn.proj.bias": rand(gen, D),
                   b + "norm2.weight": 1 + rand(gen, D), b + "norm2.bias": rand(gen, D),
                   b + "mlp.fc1.weight": rand(gen, 4 * D, D, std=D ** -0.5), b + "mlp.fc1.bias": rand(gen, 4 * D),
                   b + "mlp.fc2.weight": rand(gen, D, 4 * D, std=(4 * D) ** -0.5), b + "mlp.fc2.bias": rand(gen, D)})
    return sd


def beit_backbone(gen) -> dict:
    """BEiT fine-tuned file keys (microsoft/unilm beit), with the extras the real file carries."""
    sd = {"cls_token": rand(gen, 1, 1, D), "patch_embed.proj.weight": rand(gen, D, 3, PATCH, PATCH),
          "patch_embed.proj.bias": rand(gen, D), "fc_norm.weight": 1 + rand(gen, D), "fc_norm.bias": rand(gen, D),
          "head.weight": rand(gen, 21841, D), "head.bias": rand(gen, 21841)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + rand(gen, D), b + "norm1.bias": rand(gen, D),
                   b + "attn.qkv.weight": rand(gen, 3 * D, D, std=D ** -0.5), b + "attn.q_bias": rand(gen, D),
                   b + "attn.v_bias": rand(gen, D),
                   b + "attn.relative_position_bias_table": rand(gen, (2 * GRID - 1) ** 2 + 3, HEADS, std=0.5),
                   b + "attn.relative_position_index": torch.zeros(GRID * GRID + 1, GRID * GRID + 1, dtype=torch.long),
                   b + "attn.proj.weight": rand(gen, D, D, std=D ** -0.5), b + "attn.proj.bias": rand(gen, D),
                   b + "norm2.weight": 1 + rand(gen, D), b + "norm2.bias": rand(gen, D),
                   b + "mlp.fc1.weight": rand(gen, 4 * D, D, std=D ** -0.5), b + "mlp.fc1.bias": rand(gen, 4 * D),
                   b + "mlp.fc2.weight": rand(gen, D, 4 * D, std=(4 * D) ** -0.5), b + "mlp.fc2.bias": rand(gen, D),
                   b + "gamma_1": rand(gen, D, std=0.3), b + "gamma_2": rand(gen, D, std=0.3)})
    return sd


def official_file(name: str, gen) -> tuple[dict, dict]:
    """(what the official file of `name` holds, the backbone weights in it), per family."""
    if name.startswith("beit"):
        backbone = beit_backbone(gen)
        kept = {k: v for k, v in backbone.items() if not k.startswith("head.") and "relative_position_index" not in k}
        return {"model": backbone}, kept
    backbone = dino_v1_backbone(gen)
    if name.startswith("dino"):
        return backbone, backbone
    if name.startswith("ibot"):
        return {"state_dict": {**backbone, "head.mlp.0.weight": rand(gen, 64, D), "head.last_layer.weight_g":
                               rand(gen, 8, 1)}}, backbone
    if name.startswith(("mae", "digpt")):
        return {"model": {**backbone, "mask_token": rand(gen, 1, 1, 16), "decoder_embed.weight": rand(gen, 16, D),
                          "decoder_blocks.0.norm1.weight": rand(gen, 16), "decoder_pred.weight": rand(gen, 768, 16)},
                "epoch": 1599}, backbone
    if name.startswith("mocov3"):
        state = {f"module.base_encoder.{k}": v for k, v in backbone.items()}
        state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in backbone.items()})
        state.update({"module.base_encoder.head.0.weight": rand(gen, 64, D), "module.predictor.0.weight":
                      rand(gen, 64, 64)})
        return {"state_dict": state, "epoch": 300, "arch": "vit_base"}, backbone
    if name.startswith("deit"):
        return {"model": {**backbone, "head.weight": rand(gen, 1000, D), "head.bias": rand(gen, 1000)}}, backbone
    raise AssertionError(name)


ZOO = ["dino_vit_small_16", "dino_vit_base_16", "dino_vit_small_8", "dino_vit_base_8", "ibot_vit_small_16",
       "ibot_vit_base_16", "mae_vit_base_16", "mae_vit_large_16", "mocov3_vit_small_16", "mocov3_vit_base_16",
       "deit_vit_small_16", "deit_vit_base_16", "beit_vit_base_16", "beitv2_vit_base_16", "digpt_vit_base_16"]


@pytest.fixture
def tiny(monkeypatch):
    """Shrink a registered family to D wide, DEPTH blocks, patch 16 on a 14 x 14 grid, keeping its layout."""
    def shrink(name: str) -> str:
        spec = dataclasses.replace(registry.ENCODERS[name], embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                   patch_size=PATCH, pos_grid=GRID)
        monkeypatch.setitem(registry.ENCODERS, name, spec)
        return name
    return shrink


def test_every_table_a4_name_is_registered_with_its_download():
    for name in ZOO:
        spec = registry.ENCODERS[name]
        assert (spec.url is None) == (name == "digpt_vit_base_16"), name
    assert registry.ENCODERS["dino_vit_small_8"].url.endswith("dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth")
    assert registry.ENCODERS["mocov3_vit_base_16"].url.endswith("moco-v3/vit-b-300ep/vit-b-300ep.pth.tar")
    assert registry.ENCODERS["mae_vit_large_16"].depth == 24
    # the two iBOT files share a name upstream; the cache keeps them apart
    assert registry.ENCODERS["ibot_vit_small_16"].file_name != registry.ENCODERS["ibot_vit_base_16"].file_name


@pytest.mark.parametrize("name", ZOO)
def test_official_layout_loads_strictly_and_drops_only_named_extras(name, tiny, tmp_path):
    tiny(name)
    gen = torch.Generator().manual_seed(0)
    content, backbone = official_file(name, gen)
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    encoder = models.load_encoder(name, str(path), verbose=False)
    loaded = encoder.state_dict()
    assert set(loaded) == set(backbone)
    assert all(torch.equal(loaded[k], backbone[k]) for k in backbone)

    key = "blocks.1.mlp.fc1.bias"
    for broken, message in ((lambda sd: sd.pop(key), f"missing keys (1): {key}"),
                            (lambda sd: sd.__setitem__(key, torch.zeros(3)), f"{key}: file (3,) vs model")):
        content, _ = official_file(name, torch.Generator().manual_seed(0))
        state = content.get("model", content.get("state_dict", content))
        broken(state if not name.startswith("mocov3") else _Prefixed(state, "module.base_encoder."))
        torch.save(content, path)
        with pytest.raises(registry.WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
            models.load_encoder(name, str(path), verbose=False)


class _Prefixed:
    """Edit MoCo's prefixed state dict by backbone key name."""

    def __init__(self, state: dict, prefix: str):
        self.state, self.prefix = state, prefix

    def pop(self, key):
        return self.state.pop(self.prefix + key)

    def __setitem__(self, key, value):
        self.state[self.prefix + key] = value


def test_wrong_wrapping_is_named(tiny, tmp_path):
    tiny("mae_vit_base_16")
    path = tmp_path / "w.pth"
    torch.save(dino_v1_backbone(torch.Generator().manual_seed(0)), path)
    with pytest.raises(registry.WeightsError, match="under the key 'model'"):
        models.load_encoder("mae_vit_base_16", str(path), verbose=False)


def test_digpt_has_no_download_and_says_where_to_get_it():
    with pytest.raises(registry.WeightsError, match="D-iGPT has no stable public download"):
        models.load_encoder("digpt_vit_base_16")


def test_dino_v1_interpolation_offset_and_no_layer_scale(tiny, tmp_path):
    tiny("dino_vit_small_16")
    backbone = dino_v1_backbone(torch.Generator().manual_seed(2))
    torch.save(backbone, tmp_path / "w.pth")
    encoder = models.load_encoder("dino_vit_small_16", str(tmp_path / "w.pth"), verbose=False).eval()
    images = torch.randn(2, 3, 112, 112)  # a 7 x 7 grid from the stored 14 x 14
    grid = backbone["pos_embed"][:, 1:].reshape(1, GRID, GRID, D).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=((7 + 0.1) / GRID, (7 + 0.1) / GRID), mode="bicubic",
                            align_corners=False)
    pos = torch.cat((backbone["pos_embed"][:, :1], resized.permute(0, 2, 3, 1).reshape(1, 49, D)), dim=1)
    patches = F.conv2d(images, backbone["patch_embed.proj.weight"], backbone["patch_embed.proj.bias"], stride=PATCH)
    tokens = torch.cat((backbone["cls_token"].expand(2, -1, -1), patches.flatten(2).transpose(1, 2)), 1) + pos
    with torch.no_grad():
        got, pos = encoder.prepare_tokens(images)
        torch.testing.assert_close(got, tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(encoder.blocks[0](got, pos), direct_block(got, backbone, "blocks.0.", None),
                                   rtol=1e-4, atol=1e-5)


def direct_block(x: torch.Tensor, sd: dict, b: str, bias) -> torch.Tensor:
    """A pre-norm ViT block from its definition: no LayerScale unless the file has gamma_1/gamma_2;
    BEiT: q and v biases only, `bias` added to the scaled logits."""
    def ln(t, name):
        return F.layer_norm(t, (D,), sd[b + name + ".weight"], sd[b + name + ".bias"], eps=1e-6)
    h = ln(x, "norm1")
    if b + "attn.q_bias" in sd:
        qkv_bias = torch.cat((sd[b + "attn.q_bias"], torch.zeros(D), sd[b + "attn.v_bias"]))
    else:
        qkv_bias = sd[b + "attn.qkv.bias"]
    q, k, v = (h @ sd[b + "attn.qkv.weight"].T + qkv_bias).split(D, dim=-1)
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)
    logits = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D // HEADS)
    if bias is not None:
        logits = logits + bias
    attn = (logits.softmax(-1) @ heads(v)).transpose(1, 2).reshape(x.shape)
    attn = attn @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
    x = x + sd.get(b + "gamma_1", 1.0) * attn
    mlp = F.gelu(ln(x, "norm2") @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
    return x + sd.get(b + "gamma_2", 1.0) * (mlp @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"])


def direct_relative_bias(table: torch.Tensor, grid: int) -> torch.Tensor:
    """heads x (g*g+1) x (g*g+1), pair by pair: patch offsets index the (2g-1)^2 window, then the three
    class-token entries (class->patch, patch->class, class->class)."""
    n = grid * grid + 1
    width = 2 * grid - 1
    bias = torch.empty(table.shape[1], n, n)
    for i in range(n):
        for j in range(n):
            if i == 0 and j == 0:
                row = width * width + 2
            elif i == 0:
                row = width * width
            elif j == 0:
                row = width * width + 1
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, grid), divmod(j - 1, grid)
                row = (yi - yj + grid - 1) * width + (xi - xj + grid - 1)
            bias[:, i, j] = table[row]
    return bias


def test_beit_relative_position_bias_and_no_k_bias(tiny, tmp_path):
    tiny("beitv2_vit_base_16")
    content, kept = official_file("beitv2_vit_base_16", torch.Generator().manual_seed(3))
    torch.save(content, tmp_path / "w.pth")
    encoder = models.load_encoder("beitv2_vit_base_16", str(tmp_path / "w.pth"), verbose=False).eval()
    assert not hasattr(encoder, "pos_embed")
    images = torch.randn(2, 3, 224, 224)
    table = kept["blocks.0.attn.relative_position_bias_table"]
    with torch.no_grad():
        tokens, grid = encoder.prepare_tokens(images)
        want = direct_block(tokens, kept, "blocks.0.", direct_relative_bias(table, GRID).unsqueeze(0))
        torch.testing.assert_close(encoder.blocks[0](tokens, grid), want, rtol=1e-4, atol=1e-5)


def test_beit_at_other_sizes_resizes_the_relative_table(tiny, tmp_path):
    tiny("beit_vit_base_16")
    content, kept = official_file("beit_vit_base_16", torch.Generator().manual_seed(4))
    torch.save(content, tmp_path / "w.pth")
    encoder = models.load_encoder("beit_vit_base_16", str(tmp_path / "w.pth"), verbose=False).eval()
    table = kept["blocks.0.attn.relative_position_bias_table"]
    grid = 7  # 112 px
    window = table[:-3].T.reshape(1, HEADS, 2 * GRID - 1, 2 * GRID - 1)
    resized = F.interpolate(window, size=(2 * grid - 1, 2 * grid - 1), mode="bicubic", align_corners=False)
    resized_table = torch.cat((resized.reshape(HEADS, -1).T, table[-3:]))
    with torch.no_grad():
        tokens, pos = encoder.prepare_tokens(torch.randn(1, 3, 112, 112))
        want = direct_block(tokens, kept, "blocks.0.", direct_relative_bias(resized_table, grid).unsqueeze(0))
        assert pos == grid
        torch.testing.assert_close(encoder.blocks[0](tokens, pos), want, rtol=1e-4, atol=1e-5)


def test_input_normalisation_is_imagenet_unless_the_encoders_is_asked_for():
    from utils.config import DEFAULTS
    beit = {**DEFAULTS, "encoder": "beit_vit_base_16"}
    assert models.input_normalization(beit) == (models.IMAGENET_MEAN, models.IMAGENET_STD)
    assert models.input_normalization({**beit, "input_norm": "encoder"}) == ((0.5,) * 3, (0.5,) * 3)
    assert models.input_normalization({**beit, "encoder": "beitv2_vit_base_16", "input_norm": "encoder"}) == (
        models.IMAGENET_MEAN, models.IMAGENET_STD)


@pytest.mark.parametrize("name", ["mae_vit_base_16", "beit_vit_base_16"])
def test_dinomaly_runs_on_other_families(name, tiny):
    from utils.config import DEFAULTS
    tiny(name)
    cfg = {**DEFAULTS, "encoder": name, "encoder_weights": "random", "target_layers": [0, 1], "decoder_depth": 2,
           "fuse_layer_encoder": [[0], [1]], "fuse_layer_decoder": [[0], [1]]}
    with pytest.warns(UserWarning):
        model = models.build_model(cfg).eval()
    with torch.no_grad():
        en, de = model(torch.randn(2, 3, 112, 112))
    assert [tuple(m.shape) for m in en + de] == [(2, D, 7, 7)] * 4


def test_target_layers_follow_the_encoder_depth_and_a_list_wins():
    from utils.config import DEFAULTS, ConfigError, validate
    resolved = lambda **cfg: validate({**DEFAULTS, **cfg}, "cfg", lambda _: None)["target_layers"]
    assert DEFAULTS["target_layers"] == "auto"
    assert resolved() == [2, 3, 4, 5, 6, 7, 8, 9]  # ViT-B: the recipe
    assert resolved(encoder="mae_vit_large_16", image_size=512, crop_size=448) == [4, 6, 8, 10, 12, 14, 16, 18]
    assert resolved(encoder="dinov3_vit_huge_plus_16", image_size=512, crop_size=448) == [5, 8, 11, 13, 16, 19, 21, 24]
    assert resolved(encoder="dinov2reg_vit_giant_14") == [7, 10, 13, 17, 20, 23, 27, 30]
    assert resolved(encoder="dinov2reg_vit_large_14", target_layers=[1, 2, 3, 4, 5, 6, 7, 8]) == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ConfigError, match="'target_layers' must be a list or 'auto', got 'deep'"):
        resolved(target_layers="deep")
    with pytest.raises(ConfigError, match="--image_size 512 --crop_size 448"):
        validate({**DEFAULTS, "encoder": "dino_vit_base_16"}, "cfg", lambda _: None)
