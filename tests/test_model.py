import math

import numpy as np
import pytest
import torch

from conftest import block_outputs, encoder_layers
from models import LinearAttention, build_encoder, build_model
from utils.config import DEFAULTS
from utils.loss import global_cosine_hm


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _bicubic_axis0(values: np.ndarray, scale: float) -> np.ndarray:
    """Keys cubic convolution (a = -0.75) along axis 0 with a given scale factor, half-pixel centres,
    border indices clamped: the textbook definition that DINOv2's resize relies on."""
    n = values.shape[0]
    out = []
    for i in range(int(math.floor(n * scale))):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        t = src - base
        out.append(sum(_cubic(np.array(t - k)) * values[min(max(base + k, 0), n - 1)] for k in range(-1, 3)))
    return np.stack(out)


def test_positional_embedding_resize_matches_bicubic_definition():
    torch.manual_seed(0)
    encoder = build_encoder("dinov2_vit_tiny_14")
    grid = encoder.pos_embed[0, 1:].detach().double().numpy().reshape(37, 37, -1)
    scale = (28 + 0.1) / 37
    expected = _bicubic_axis0(_bicubic_axis0(grid, scale).transpose(1, 0, 2), scale).transpose(1, 0, 2)
    resized = encoder.interpolate_pos_encoding(28 * 28, 392, 392)[0].detach().double().numpy()
    assert resized.shape == (1 + 28 * 28, 64)
    np.testing.assert_allclose(resized[0], encoder.pos_embed[0, 0].detach().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(resized[1:].reshape(28, 28, -1), expected, atol=2e-6)


def test_token_order_cls_registers_patches_and_registers_have_no_pos_embed():
    torch.manual_seed(0)
    encoder = build_encoder("dinov2reg_vit_tiny_14")
    with torch.no_grad():
        encoder.register_tokens.normal_()
        images = torch.randn(2, 3, 112, 112)
        tokens, block_pos = encoder.prepare_tokens(images)
        pos = encoder.interpolate_pos_encoding(64, 112, 112)
        patches = encoder.patch_embed(images)
    assert tokens.shape == (2, 1 + 4 + 64, 64) and block_pos is None
    torch.testing.assert_close(tokens[:, 0], (encoder.cls_token + pos[:, :1])[:, 0].expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:5], encoder.register_tokens.expand(2, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, 5:], patches + pos[:, 1:])


def test_linear_attention_matches_direct_definition():
    torch.manual_seed(0)
    attention = LinearAttention(dim=16, num_heads=2)
    torch.nn.init.normal_(attention.qkv.weight)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        out = attention(x).double().numpy()
        qkv = attention.qkv(x).double().numpy().reshape(2, 7, 3, 2, 8)
        proj_w, proj_b = attention.proj.weight.double().numpy(), attention.proj.bias.double().numpy()
    phi = lambda z: np.where(z > 0, z + 1, np.exp(z))
    expected = np.zeros((2, 7, 16))
    for b in range(2):
        heads = []
        for h in range(2):
            q, k, v = phi(qkv[b, :, 0, h]), phi(qkv[b, :, 1, h]), qkv[b, :, 2, h]
            kv = sum(np.outer(k[s], v[s]) for s in range(7))
            k_sum = k.sum(axis=0)
            heads.append(np.stack([q[s] @ kv / (q[s] @ k_sum) for s in range(7)]))
        expected[b] = np.concatenate(heads, axis=1) @ proj_w.T + proj_b
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = build_model({**DEFAULTS, "encoder": "dinov2reg_vit_small_14", "encoder_weights": "random"})
    return model.eval()


def test_forward_groups_layers_as_the_recipe(small_model):
    model = small_model
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        en, de = model(images)
        layers = encoder_layers(model.encoder, images, 10)
        target = layers[2:10]
        decoded = block_outputs(model.bottleneck(torch.stack(target).mean(0)), model.decoder)
    to_map = lambda t: t[:, 5:].transpose(1, 2).reshape(2, 384, 8, 8)
    expected_en = [to_map(torch.stack(target[0:4]).mean(0)), to_map(torch.stack(target[4:8]).mean(0))]
    expected_de = [to_map(torch.stack(decoded[4:8]).mean(0)), to_map(torch.stack(decoded[0:4]).mean(0))]
    for got, want in zip(en + de, expected_en + expected_de):
        assert got.shape == (2, 384, 8, 8)
        torch.testing.assert_close(got, want)


def test_blocks_after_last_target_layer_never_run_and_encoder_is_frozen(small_model):
    calls = []
    hooks = [small_model.encoder.blocks[i].register_forward_hook(lambda *a, i=i: calls.append(i)) for i in (9, 10, 11)]
    small_model.train()
    en, de = small_model(torch.randn(2, 3, 56, 56))
    for hook in hooks:
        hook.remove()
    small_model.eval()
    assert calls == [9]
    assert all(not t.requires_grad for t in en) and all(t.requires_grad for t in de)
    assert not any(p.requires_grad for p in small_model.encoder.parameters())
    assert not small_model.encoder.training


def test_reference_initialisation_of_trainable_layers(small_model):
    linears = [m for m in list(small_model.bottleneck.modules()) + list(small_model.decoder.modules())
               if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.abs().max() <= 0.03
    assert 0.0097 < weights.std() < 0.0100  # std 0.01 truncated at 3 sigma: 0.01 * sqrt(0.9733)
    assert all(torch.all(m.bias == 0) for m in linears)
    norms = [m for m in small_model.decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 16 and all(m.eps == 1e-8 and torch.all(m.weight == 1) for m in norms)


def test_bottleneck_dropout_is_applied_three_times():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = build_model({**DEFAULTS, "encoder": "dinov2_vit_tiny_14", "encoder_weights": "random", "dropout": 0.5})
    calls = []
    model.bottleneck.drop.register_forward_hook(lambda *a: calls.append(1))
    model.bottleneck(torch.randn(1, 3, 64))
    assert len(calls) == 3


def test_softmax_attention_ablation_builds_and_rejects_unknown():
    with pytest.warns(UserWarning):
        model = build_model({**DEFAULTS, "encoder": "dinov2_vit_tiny_14", "encoder_weights": "random",
                             "attention": "softmax"})
    assert type(model.decoder[0].attn).__name__ == "Attention"
    with pytest.raises(ValueError, match="attention must be"), pytest.warns(UserWarning):
        build_model({**DEFAULTS, "encoder": "dinov2_vit_tiny_14", "encoder_weights": "random",
                     "attention": "performer"})


def test_grad_checkpoint_recomputes_decoder_blocks_with_the_same_loss_and_gradients():
    """The checkpointed step reruns each decoder block in the backward pass (counted), and its loss and every
    gradient equal the stored-activation step bit for bit (same seed, same dropout draws)."""
    cfg = {**DEFAULTS, "encoder": "dinov2_vit_tiny_14", "encoder_weights": "random", "target_layers": list(range(2, 10))}
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    results = []
    for grad_checkpoint in (False, True):
        torch.manual_seed(0)
        with pytest.warns(UserWarning):
            model = build_model({**cfg, "grad_checkpoint": grad_checkpoint}).train()
        calls = []
        model.decoder[0].register_forward_pre_hook(lambda *a: calls.append(1))
        en, de = model(images)
        loss = global_cosine_hm(en, de, 0.5)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)))
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls, calls_ckpt) == (1, 2)
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    assert all(torch.equal(grads[name], grads_ckpt[name]) for name in grads)
