"""TIPS: every registered file name and size is Google's, the loader reads Google's .npz layout strictly,
and the forward (one register token without a position, the bilinear antialiased position resize, the
So400m and g feed-forwards) is pinned against a direct computation written here from Google's
pytorch/image_encoder.py."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from conftest import encoder_layers
from models import registry

D, HEADS, DEPTH, PATCH, GRID = 48, 2, 2, 14, 4  # a tiny file built for 56 px (a 4 x 4 position grid)


def google_file(path, gen, hidden: int = 4 * D, swiglu: bool = False, grid: int = GRID, depth: int = DEPTH):
    """A TIPS vision file key by key as Google's .npz archives hold VisionTransformer(block_chunks=0)'s state
    dict: flat float32 arrays, one register token, LayerScale gammas, fc1/fc2 (or w12/w3 for g)."""
    rand = lambda *shape, std=0.05: (torch.randn(*shape, generator=gen) * std).numpy()
    arrays = {"cls_token": rand(1, 1, D), "pos_embed": rand(1, 1 + grid * grid, D, std=0.5),
              "register_tokens": rand(1, 1, D), "mask_token": rand(1, D),
              "patch_embed.proj.weight": rand(D, 3, PATCH, PATCH), "patch_embed.proj.bias": rand(D),
              "norm.weight": 1 + rand(D), "norm.bias": rand(D)}
    for i in range(depth):
        b = f"blocks.{i}."
        arrays.update({b + "norm1.weight": 1 + rand(D), b + "norm1.bias": rand(D),
                       b + "attn.qkv.weight": rand(3 * D, D, std=D ** -0.5), b + "attn.qkv.bias": rand(3 * D),
                       b + "attn.proj.weight": rand(D, D, std=D ** -0.5), b + "attn.proj.bias": rand(D),
                       b + "ls1.gamma": 0.5 + rand(D), b + "norm2.weight": 1 + rand(D), b + "norm2.bias": rand(D),
                       b + "ls2.gamma": 0.5 + rand(D)})
        layers = (("w12", 2 * hidden, D), ("w3", D, hidden)) if swiglu else (("fc1", hidden, D), ("fc2", D, hidden))
        for layer, out_width, in_width in layers:
            arrays[f"{b}mlp.{layer}.weight"] = rand(out_width, in_width, std=in_width ** -0.5)
            arrays[f"{b}mlp.{layer}.bias"] = rand(out_width)
    np.savez(path, **arrays)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


@pytest.fixture
def tiny(monkeypatch):
    """Shrink a registered TIPS size to D wide, DEPTH blocks and a GRID position grid, keeping the rest."""
    def shrink(name: str, **changes) -> str:
        spec = dataclasses.replace(registry.ENCODERS[name], embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                   pos_grid=GRID, **changes)
        monkeypatch.setitem(registry.ENCODERS, name, spec)
        return name
    return shrink


def test_registry_holds_googles_files_and_sizes():
    v1 = "https://storage.googleapis.com/tips_data/v1_0/checkpoints/pytorch/"
    v2 = "https://storage.googleapis.com/tips_data/v2_0/checkpoints/pytorch/"
    expected = {  # name: (width, blocks, heads, FFN, position grid, URL)
        "tips_vit_small_14": (384, 12, 6, "mlp", 32, v1 + "tips_oss_s14_highres_distilled_vision.npz"),
        "tips_vit_base_14": (768, 12, 12, "mlp", 32, v1 + "tips_oss_b14_highres_distilled_vision.npz"),
        "tips_vit_large_14": (1024, 24, 16, "mlp", 32, v1 + "tips_oss_l14_highres_distilled_vision.npz"),
        "tips_vit_so400m_14": (1152, 27, 16, "mlp", 32,
                               v1 + "tips_oss_so400m14_highres_largetext_distilled_vision.npz"),
        "tips_vit_giant_14": (1536, 40, 24, "swiglu", 32, v1 + "tips_oss_g14_highres_vision.npz"),
        "tips_vit_giant_lowres_14": (1536, 40, 24, "swiglu", 16, v1 + "tips_oss_g14_lowres_vision.npz"),
        "tipsv2_vit_base_14": (768, 12, 12, "mlp", 32, v2 + "tips_v2_oss_b14_vision.npz"),
        "tipsv2_vit_large_14": (1024, 24, 16, "mlp", 32, v2 + "tips_v2_oss_l14_vision.npz"),
        "tipsv2_vit_so400m_14": (1152, 27, 16, "mlp", 32, v2 + "tips_v2_oss_so14_vision.npz"),
        "tipsv2_vit_giant_14": (1536, 40, 24, "swiglu", 32, v2 + "tips_v2_oss_g14_vision.npz")}
    for name, (dim, depth, heads, ffn, grid, url) in expected.items():
        spec = registry.ENCODERS[name]
        assert (spec.embed_dim, spec.depth, spec.num_heads, spec.ffn, spec.pos_grid, spec.url) == \
               (dim, depth, heads, ffn, grid, url), name
        assert (spec.patch_size, spec.num_register_tokens, spec.mean, spec.std) == (14, 1, (0, 0, 0), (1, 1, 1))
    # Google's widths on the real sizes, built on the meta device: So400m's MLP 4304, g's SwiGLU
    # (int(4 * 1536 * 2 / 3) + 7) // 8 * 8 = 4096 wide, fused w12
    with torch.device("meta"):
        so400m = registry.build_encoder("tips_vit_so400m_14").state_dict()
        giant = registry.build_encoder("tips_vit_giant_lowres_14").state_dict()
        small = registry.build_encoder("tips_vit_small_14").state_dict()
    assert so400m["blocks.26.mlp.fc1.weight"].shape == (4304, 1152) and so400m["pos_embed"].shape == (1, 1025, 1152)
    assert giant["blocks.39.mlp.w12.weight"].shape == (8192, 1536) and giant["pos_embed"].shape == (1, 257, 1536)
    assert len(small) == 6 + 12 * 14 + 2  # ViT-S: 6 embedding keys, 14 per block, the final norm
    assert registry.default_target_layers(27) == [5, 7, 9, 11, 14, 16, 18, 20]


def resize_weights(out_size: int, in_size: int) -> torch.Tensor:
    """The antialiased bilinear resize as a matrix (out x in): a triangle filter as wide as the scale when
    shrinking (one input step when growing), centred on each output pixel, its weights normalised."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        for j in range(in_size):
            weights[i, j] = max(0.0, 1 - abs(j + 0.5 - centre) / support)
    return weights / weights.sum(1, keepdim=True)


def direct_tips(sd: dict, images: torch.Tensor, swiglu: bool = False) -> list[torch.Tensor]:
    """Every block's output, computed from the definition in float64: [class + pos 0, the register token,
    patches + the resized position grid], pre-norm blocks with LayerScale, softmax attention."""
    sd = {k: v.double() for k, v in sd.items()}
    images = images.double()
    h, w = images.shape[-2] // PATCH, images.shape[-1] // PATCH
    patches = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    patches = patches.flatten(2).transpose(1, 2)
    grid = sd["pos_embed"][0, 1:].reshape(GRID, GRID, D)
    if (h, w) != (GRID, GRID):
        grid = torch.einsum("ia,abd,jb->ijd", resize_weights(h, GRID), grid, resize_weights(w, GRID))
    B = images.shape[0]
    x = torch.cat((sd["cls_token"].expand(B, 1, D) + sd["pos_embed"][:, :1], sd["register_tokens"].expand(B, 1, D),
                   patches + grid.reshape(1, h * w, D)), dim=1)
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))
    outputs = []
    for i in range(DEPTH):
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        norm = lambda t, n: F.layer_norm(t, (D,), p[n + ".weight"], p[n + ".bias"], eps=1e-6)
        q, k, v = F.linear(norm(x, "norm1"), p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(
            B, -1, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) / math.sqrt(D // HEADS)).softmax(-1) @ v
        attention = F.linear(attention.transpose(1, 2).reshape(B, -1, D), p["attn.proj.weight"], p["attn.proj.bias"])
        x = x + p["ls1.gamma"] * attention
        y = norm(x, "norm2")
        if swiglu:
            x1, x2 = F.linear(y, p["mlp.w12.weight"], p["mlp.w12.bias"]).chunk(2, dim=-1)
            y = F.linear(x1 * torch.sigmoid(x1) * x2, p["mlp.w3.weight"], p["mlp.w3.bias"])
        else:
            y = F.linear(gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                         p["mlp.fc2.bias"])
        x = x + p["ls2.gamma"] * y
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("name,hidden,swiglu", [("tips_vit_small_14", 4 * D, False),
                                                ("tips_vit_so400m_14", 100, False),
                                                ("tipsv2_vit_giant_14", 128, True)])  # (int(4 D 2/3)+7)//8*8
def test_official_npz_loads_strictly_and_computes_the_definition(name, hidden, swiglu, tiny, tmp_path):
    tiny(name, options={"mlp_hidden_dim": hidden} if name.endswith("so400m_14") else {})
    cache = tmp_path / "cache"
    cache.mkdir()
    sd = google_file(cache / registry.ENCODERS[name].file_name, torch.Generator().manual_seed(0), hidden, swiglu)
    encoder = models.load_encoder(name, weights_dir=str(cache), verbose=False).eval()  # the official route
    state = encoder.state_dict()
    assert set(state) == set(sd) and all(torch.equal(state[k], v) for k, v in sd.items())
    assert encoder.num_prefix_tokens == 2 and (encoder.mean, encoder.std) == ((0, 0, 0), (1, 1, 1))
    images = torch.rand(2, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    # the stored grid (no resize), a larger one, a smaller non-square one (antialiased on both axes)
    for size in ((56, 56), (84, 84), (42, 28)):
        batch = F.interpolate(images, size=size, mode="bilinear")
        with torch.no_grad():
            ours = encoder_layers(encoder, batch, DEPTH)
        for mine, direct in zip(ours, direct_tips(sd, batch, swiglu)):
            assert torch.allclose(mine.double(), direct, atol=2e-5), (size, (mine.double() - direct).abs().max())


def test_a_wrong_or_foreign_file_is_one_line_naming_it(tiny, tmp_path):
    name = tiny("tips_vit_base_14")
    path = tmp_path / "weights.npz"
    for broken, message in ((lambda a: a.pop("register_tokens"), r"missing keys \(1\): register_tokens"),
                            (lambda a: a.__setitem__("head.weight", np.zeros(3)), r"unexpected keys \(1\): head.weight"),
                            (lambda a: a.__setitem__("pos_embed", np.zeros((1, 1025, D), np.float32)),
                             rf"pos_embed: file \(1, 1025, {D}\) vs model \(1, 17, {D}\)")):
        arrays = {k: v.numpy() for k, v in google_file(path, torch.Generator().manual_seed(0)).items()}
        broken(arrays)
        np.savez(path, **arrays)
        for check in (models.load_encoder, registry.check_encoder_weights):
            with pytest.raises(registry.WeightsError, match=message) as error:
                check(name, str(path))
            assert str(path) in str(error.value) and "\n" not in str(error.value)
    torch.save({"cls_token": torch.zeros(1)}, path)  # a PyTorch file is no .npz
    with pytest.raises(registry.WeightsError, match="a zip archive of something else, not a NumPy .npz archive"):
        models.load_encoder(name, str(path))
    np.savez(path, cls_token=np.array([{"a": 1}], dtype=object))  # pickled objects are never loaded
    with pytest.raises(registry.WeightsError, match=r"could not read encoder weights .*weights.npz: .*pickle"):
        models.load_encoder(name, str(path))
    path.write_text("<html>Not Found</html>")
    with pytest.raises(registry.WeightsError, match="not a NumPy .npz archive"):
        models.load_encoder(name, str(path))


def test_input_norm_encoder_feeds_tips_its_own_statistics():
    cfg = {"encoder": "tips_vit_large_14", "input_norm": "encoder"}
    assert models.input_normalization(cfg) == ((0, 0, 0), (1, 1, 1))
    assert models.input_normalization({**cfg, "input_norm": "imagenet"}) == (models.IMAGENET_MEAN, models.IMAGENET_STD)
