"""The attention figure: its weights against the definitions, the decoder/encoder pairing, and the script."""
import numpy as np
import pytest
import torch

import visualize_attention
from conftest import run_in_process
from models import build_encoder, build_model
from models.attention_maps import attention_weights, paired_encoder_block
from models.dinomaly import neighbour_mask
from utils.config import DEFAULTS


@pytest.fixture(scope="module")
def tiny_model():
    """dinov2reg_vit_tiny_14 (4 register tokens); the decoder's weights drawn wide enough that its attention
    is far from uniform."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = build_model({**DEFAULTS, "encoder": "dinov2reg_vit_tiny_14", "encoder_weights": "random",
                             "target_layers": list(range(2, 10))})
    with torch.no_grad():
        for parameter in model.decoder.parameters():
            parameter.normal_(0, 0.3)
    return model.eval()


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * weight + bias


def _heads(block, tokens: torch.Tensor, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v per head (heads x N x d) of one image, in float64 numpy, from the block's own parameters."""
    p = {k: v.detach().double().numpy() for k, v in block.state_dict().items()}
    x = _layer_norm(tokens[0].double().numpy(), p["norm1.weight"], p["norm1.bias"], eps)
    qkv = x @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
    heads = block.attn.num_heads
    n, width = qkv.shape[0], qkv.shape[1] // 3
    q, k, v = (qkv[:, i * width:(i + 1) * width].reshape(n, heads, -1).transpose(1, 0, 2) for i in range(3))
    return q, k, v


def test_linear_attention_weights_are_phi_q_phi_k_over_the_normaliser(tiny_model):
    block = tiny_model.decoder[2]
    tokens = torch.randn(1, 5 + 16, 64, generator=torch.Generator().manual_seed(1))
    got = attention_weights(block, tokens)
    q, k, v = _heads(block, tokens, 1e-8)
    phi = lambda z: np.where(z > 0, z + 1, np.exp(z))
    scores = np.einsum("hid,hjd->hij", phi(q), phi(k))
    want = scores / scores.sum(-1, keepdims=True)
    assert got.shape == (1, 2, 21, 21)
    np.testing.assert_allclose(got[0].double().numpy(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 2, 21))
    assert np.ptp(want, axis=-1).min() > 0.2 / 21  # every row far from uniform: the comparison means something
    # the forward pass mixes v with exactly these weights
    mixed = np.einsum("hij,hjd->ihd", got[0].double().numpy(), v).reshape(21, 64)
    with torch.no_grad():
        out = block.attn(block.norm1(tokens))[0].double().numpy()
    proj = {k: v.detach().double().numpy() for k, v in block.attn.proj.state_dict().items()}
    np.testing.assert_allclose(out, mixed @ proj["weight"].T + proj["bias"], rtol=1e-4, atol=1e-5)
    mask = neighbour_mask((4, 4), 3, 5, tokens.device)
    masked = attention_weights(block, tokens, mask=mask)
    assert torch.all(masked[..., mask] == 0)
    torch.testing.assert_close(masked.sum(-1), torch.ones(1, 2, 21))


def test_encoder_weights_are_the_softmax_of_its_scaled_dot_products(tiny_model):
    block = tiny_model.encoder.blocks[5]
    tokens = torch.randn(1, 5 + 16, 64, generator=torch.Generator().manual_seed(2))
    got = attention_weights(block, tokens)
    q, k, _ = _heads(block, tokens, 1e-6)
    logits = np.einsum("hid,hjd->hij", q, k) / np.sqrt(q.shape[-1])
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got[0].double().numpy(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 2, 21))


def test_rope_encoder_weights_reproduce_its_attention_output():
    """DINOv3 rotates queries and keys: the weights read from its fused attention call, applied to v, give
    back the block's attention output."""
    torch.manual_seed(0)
    encoder = build_encoder("dinov3_vit_tiny_16").eval()
    tokens, rope = encoder.prepare_tokens(torch.randn(1, 3, 64, 64))
    block = encoder.blocks[0]
    weights = attention_weights(block, tokens, rope)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, tokens.shape[1]))
    with torch.no_grad():
        x = block.norm1(tokens)
        v = block.attn.qkv(x).reshape(1, tokens.shape[1], 3, 2, 32)[:, :, 2].transpose(1, 2)
        mixed = (weights @ v).transpose(1, 2).reshape(1, tokens.shape[1], 64)
        torch.testing.assert_close(block.attn.proj(mixed), block.attn(x, rope), rtol=1e-4, atol=1e-5)


def test_decoder_blocks_pair_with_the_encoder_layers_they_reconstruct(tiny_model):
    assert [paired_encoder_block(tiny_model, j) for j in range(8)] == [9, 8, 7, 6, 5, 4, 3, 2]


def test_script_draws_the_figure_and_refuses_points_outside_the_crop(trained_run, synthetic_data, tmp_path, capsys):
    image = synthetic_data / "stripes" / "test" / "good" / "000.png"  # 128 x 128, resized to 128, crop 112
    output = tmp_path / "figure" / "attention.png"
    result = run_in_process(visualize_attention, ["--checkpoint", trained_run, "--image", image,
                                                  "--points", "20,30", "100,64", "--output", output], capsys)
    assert result.returncode == 0, result.stderr
    drawn = visualize_attention.cv2.imread(str(output))
    assert drawn.shape == (4 * (18 + visualize_attention.CELL) + 3 * 4, 8 * visualize_attention.CELL + 7 * 4, 3)
    result = run_in_process(visualize_attention, ["--checkpoint", trained_run, "--image", image,
                                                  "--points", "2,64", "--output", output], capsys)
    assert result.returncode == 1 and "falls outside the centre crop" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
