"""DINOv3 Vision Transformers (facebookresearch/dinov3), written to load Meta's released files key for key
and to compute what Meta's code computes in eval mode.

What differs from DINOv2's ViT (models/dinov2.py):
  - no absolute position embedding: 2-D rotary embeddings (RoPE) rotate the patch tokens' queries and keys
    inside every attention, so any grid works and nothing is interpolated;
  - tokens [class, 4 storage tokens, patches]; the class token is `cls_token + 0 * mask_token`, as Meta's;
  - the qkv bias is `bias * bias_mask`, both read from the file (the mask is a persistent buffer);
  - LayerNorm eps 1e-5; a SwiGLU with separate w1/w2 for the "plus" sizes and the 7B.
RoPE's coordinate shift, jitter and rescale are training augmentations of DINOv3's own pre-training: they
are not implemented, so the frozen encoder computes eval features whatever mode the model is in.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dinov2 import LayerScale, Mlp, PatchEmbed
from .encoder_interface import IMAGENET_MEAN, IMAGENET_STD

Rope = tuple[torch.Tensor, torch.Tensor]  # (sin, cos), each (h*w) x head_dim


class RopePositionEmbedding(nn.Module):
    """Axial RoPE with Meta's "separate" coordinate normalisation; `periods` comes from the file.

    The released files hold periods rounded to bf16 (their training builds kept the bf16 default), so
    recomputing 100 ** (2i / (head_dim / 2)) would give other features: the buffer is only ever loaded."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("periods", torch.ones(head_dim // 4))

    def forward(self, h: int, w: int) -> Rope:
        dtype, device = torch.float32, self.periods.device
        coords_h = torch.arange(0.5, h, dtype=dtype, device=device) / h
        coords_w = torch.arange(0.5, w, dtype=dtype, device=device) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0  # [h*w, 2] in [-1, 1]
        angles = 2 * math.pi * coords[:, :, None] / self.periods.to(dtype)[None, None, :]  # [h*w, 2, head_dim/4]
        angles = angles.flatten(1, 2).tile(2)  # row angles, column angles, twice: [h*w, head_dim]
        return torch.sin(angles), torch.cos(angles)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the last h*w tokens of x (B x heads x N x head_dim) in fp32; prefix tokens pass unchanged."""
    sin, cos = rope
    prefix = x.shape[-2] - sin.shape[-2]
    rotated = x[:, :, prefix:].to(sin.dtype)
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat((x[:, :, :prefix], rotated.to(x.dtype)), dim=-2)


class LinearKMaskedBias(nn.Linear):
    """The qkv projection whose effective bias is bias * bias_mask, the mask read from the file (Meta
    initialises it to 1 over q and v, 0 over k, as here for a random encoder)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        mask = torch.ones(out_features)
        mask[out_features // 3: 2 * out_features // 3] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class RopeAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = LinearKMaskedBias(dim, 3 * dim) if qkv_bias else nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        x = F.scaled_dot_product_attention(apply_rope(q, rope), apply_rope(k, rope), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), hidden width int(2/3 of `hidden_dim`) rounded up to a multiple of `align`."""

    def __init__(self, dim: int, hidden_dim: int, align: int):
        super().__init__()
        hidden = int(hidden_dim * 2 / 3)
        hidden += -hidden % align
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class RopeBlock(nn.Module):
    """Pre-norm block with LayerScale; LayerNorm eps 1e-5 ("layernormbf16" in Meta's code)."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float, ffn: str, swiglu_align: int, qkv_bias: bool):
        super().__init__()
        hidden = int(dim * ffn_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = RopeAttention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, 1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = SwiGLU(dim, hidden, swiglu_align) if ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, 1e-5)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV3VisionTransformer(nn.Module):
    """A DINOv3 ViT backbone. Implements models.encoder_interface.Encoder: `prepare_tokens` returns the
    tokens and the RoPE (sin, cos) of the image's grid, which every block takes.

    `untie_local_cls_norm` (the 7B): the file also holds the local-crop class-token norm of pre-training,
    loaded with the rest and never applied."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, ffn: str = "mlp", ffn_ratio: float = 4.0,
                 swiglu_align: int = 8, qkv_bias: bool = True, num_storage_tokens: int = 4, patch_size: int = 16,
                 untie_local_cls_norm: bool = False, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_storage_tokens = num_storage_tokens
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, num_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads)
        self.blocks = nn.ModuleList([RopeBlock(embed_dim, num_heads, ffn_ratio, ffn, swiglu_align, qkv_bias)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.local_cls_norm: Optional[nn.LayerNorm] = nn.LayerNorm(embed_dim, eps=1e-5) if untie_local_cls_norm else None
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_storage_tokens

    def prepare_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        """[class, storage, patches] and the RoPE of the (H / 16) x (W / 16) grid."""
        B, _, h, w = images.shape
        x = self.patch_embed(images)
        cls_token = self.cls_token + 0 * self.mask_token
        x = torch.cat((cls_token.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1), x), dim=1)
        return x, self.rope_embed(h // self.patch_size, w // self.patch_size)
