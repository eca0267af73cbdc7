"""The paper's variants as config switches: each computes what its name says (Tables 3/A1, 4, 5, A5, A6)."""
import pytest
import torch
import torch.nn.functional as F

import models
from conftest import block_outputs, encoder_layers
from models.dinomaly import ConvMixer, FeatureJitter, LinearAttention, neighbour_mask
from models.dinov2 import Attention
from utils.config import DEFAULTS
from utils.loss import global_cosine_hm


def tiny_model(**overrides) -> models.Dinomaly:
    cfg = {**DEFAULTS, "encoder": "dinov2reg_vit_tiny_14", "encoder_weights": "random", **overrides}
    with pytest.warns(UserWarning):
        return models.build_model(cfg)


def direct_neighbours(h: int, w: int, n: int, prefix: int) -> torch.Tensor:
    """The reference's generate_mask, loop by loop: True = removed."""
    mask = torch.zeros(prefix + h * w, prefix + h * w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            for a in range(max(i - n // 2, 0), min(i + n // 2 + 1, h)):
                for b in range(max(j - n // 2, 0), min(j + n // 2 + 1, w)):
                    mask[prefix + i * w + j, prefix + a * w + b] = True
    return mask


@pytest.mark.parametrize("n", [1, 3])
def test_neighbour_mask_hides_the_square_around_each_query(n):
    assert torch.equal(neighbour_mask((5, 4), n, 5, torch.device("cpu")), direct_neighbours(5, 4, n, 5))


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_masked_attention_weights_are_zero_inside_the_window(kind):
    torch.manual_seed(0)
    dim, heads, grid, prefix = 16, 2, (4, 4), 1
    attn = Attention(dim, heads) if kind == "softmax" else LinearAttention(dim, heads)
    x = torch.randn(2, prefix + 16, dim)
    mask = neighbour_mask(grid, 3, prefix, x.device)
    q, k, _ = attn.qkv(x).reshape(2, 17, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    if kind == "softmax":
        weights = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1).masked_fill(mask, 0)
    else:
        raw = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)).masked_fill(mask, 0)
        weights = raw / raw.sum(-1, keepdim=True)
    assert torch.all(weights[..., mask] == 0) and torch.all(weights[..., ~mask] > 0)
    want = attn.proj((weights @ attn.qkv(x).reshape(2, 17, 3, heads, -1).permute(2, 0, 3, 1, 4)[2])
                     .transpose(1, 2).reshape(2, 17, dim))
    torch.testing.assert_close(attn(x, mask), want, rtol=1e-5, atol=1e-6)


def test_model_uses_the_mask_only_when_asked():
    torch.manual_seed(0)
    plain, masked = tiny_model(), tiny_model(neighbor_mask=3)
    masked.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(images)[1][0], masked.eval()(images)[1][0])
        masked.neighbor_mask = 0
        assert torch.equal(plain(images)[1][0], masked(images)[1][0])


def test_feature_jitter_is_uniads_definition_in_training_only():
    jitter = FeatureJitter(scale=5.0)
    x = torch.randn(2, 10, 8)
    torch.manual_seed(3)
    got = jitter(x)
    torch.manual_seed(3)
    noise = torch.randn(2, 10, 8)
    torch.testing.assert_close(got, x + noise * x.norm(dim=2, keepdim=True) / 8 * 5.0)
    assert torch.equal(jitter.eval()(x), x)
    model = tiny_model(feature_jitter=20.0, dropout=0.0)
    assert isinstance(model.bottleneck.jitter, FeatureJitter) and model.bottleneck.drop.p == 0.0
    assert isinstance(tiny_model().bottleneck.jitter, torch.nn.Identity)


def test_conv_mixer_is_1x1_gelu_depthwise_1x1_on_patch_tokens_only():
    torch.manual_seed(0)
    mixer = ConvMixer(8, kernel=5)
    x = torch.randn(2, 16, 8)
    hidden = F.gelu(x @ mixer.pwconv1.weight.T).transpose(1, 2).reshape(2, 16, 4, 4)
    spatial = F.conv2d(hidden, mixer.dwconv.weight, padding=2, groups=16)
    torch.testing.assert_close(mixer(x), spatial.flatten(2).transpose(1, 2) @ mixer.pwconv2.weight.T)
    model = tiny_model(attention="conv", conv_kernel=7)
    assert model.decoder[0].attn.dwconv.kernel_size == (7, 7) and model.decoder_prefix == 0
    with torch.no_grad():
        en, de = model.eval()(torch.randn(2, 3, 56, 56))
    assert [tuple(m.shape) for m in de] == [(2, 64, 4, 4)] * 2
    with pytest.raises(ValueError, match="neighbor_mask applies to attention"), pytest.warns(UserWarning):
        models.build_model({**DEFAULTS, "encoder": "dinov2_vit_tiny_14", "encoder_weights": "random",
                            "attention": "conv", "neighbor_mask": 3})


def test_loose_loss_off_is_the_plain_global_cosine_loss():
    """hm_factor 1 (Table 3 without LL): every position keeps its full gradient."""
    en = [torch.randn(2, 8, 4, 4) for _ in range(2)]
    de1 = [torch.randn(2, 8, 4, 4, requires_grad=True) for _ in range(2)]
    de2 = [d.detach().clone().requires_grad_() for d in de1]
    global_cosine_hm(en, de1, p=0.9, factor=1.0).backward()
    plain = sum(torch.mean(1 - F.cosine_similarity(e.flatten(1), d.flatten(1))) for e, d in zip(en, de2)) / 2
    plain.backward()
    for a, b in zip(de1, de2):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("groups,encoder_groups", [
    ([[0, 1, 2, 3, 4, 5, 6, 7]], 1),                      # 1 group: all 8 layers added
    ([[i] for i in range(8)], 8),                         # dense layer-to-layer
    ([[1], [3], [5], [7]], 4),                            # sparse layer-to-layer, every 2
])
def test_constraints_are_groupings(groups, encoder_groups):
    model = tiny_model(fuse_layer_encoder=groups, fuse_layer_decoder=groups)
    with torch.no_grad():
        en, de = model.eval()(torch.randn(1, 3, 56, 56))
    assert len(en) == len(de) == encoder_groups


def test_layer_to_cat_layer_concatenates_the_group_and_widens_the_last_block():
    torch.manual_seed(0)
    model = tiny_model(fuse_mode="concat", fuse_layer_encoder=[[1, 3, 5, 7]], fuse_layer_decoder=[[7]]).eval()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        en, de = model(images)
        layers = encoder_layers(model.encoder, images, 10)
        picked = torch.cat([layers[t] for t in (3, 5, 7, 9)], dim=-1)[:, 5:]  # target layers 1, 3, 5, 7
        torch.testing.assert_close(en[0], picked.transpose(1, 2).reshape(2, 256, 4, 4))
        x = block_outputs(model.bottleneck(torch.stack(layers[2:10], dim=1).mean(dim=1)), model.decoder)[-1]
        torch.testing.assert_close(de[0], model.projection(x)[:, 5:].transpose(1, 2).reshape(2, 256, 4, 4))
    assert any(p is model.projection.weight for p in model.trainable_parameters())
    with pytest.raises(ValueError, match="takes one group"), pytest.warns(UserWarning):
        models.build_model({**DEFAULTS, "encoder": "dinov2_vit_tiny_14", "encoder_weights": "random",
                            "fuse_mode": "concat"})
