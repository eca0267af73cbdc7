"""DINO-style Vision Transformers, written to load the official checkpoints key for key.

One class serves two generations that differ only in what follows:
  DINOv2 (facebookresearch/dinov2): LayerScale in every block (`ls1.gamma`), a `mask_token`, optional
      register tokens, built at 518 px (a 37 x 37 position grid for 14-pixel patches);
  DINO v1's ViT (facebookresearch/dino), which the reference also runs iBOT, MAE, MoCo v3, DeiT and
      D-iGPT weights in: no LayerScale, no mask token, built at 224 px (14 x 14 grid for 16-pixel patches).
Both: pre-norm blocks, LayerNorm eps 1e-6, qkv bias, and a bicubic position-embedding resize with
the +0.1 offset. Module names mirror the official code so that strict loading is the whole story.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder_interface import IMAGENET_MEAN, IMAGENET_STD


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Softmax multi-head self-attention through PyTorch's fused kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`mask` (the decoder's neighbour-mask ablation): weights where it is True are set to 0 after the
        softmax, without renormalising, as the reference does."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if mask is None:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1).masked_fill(mask, 0.0) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """The feed-forward of DINOv2 ViT-g: hidden width 2/3 of 4x, rounded up to a multiple of 8."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        hidden_dim = (int(hidden_dim * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm block, LayerNorm eps 1e-6; with LayerScale (DINOv2) or without (DINO v1, `layer_scale` False).
    The feed-forward is 4 x dim wide unless `hidden_dim` says otherwise (TIPS So400m)."""

    def __init__(self, dim: int, num_heads: int, ffn: str = "mlp", layer_scale: bool = True,
                 hidden_dim: Optional[int] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, 1e-5) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (SwiGLUFFN if ffn == "swiglu" else Mlp)(dim, hidden_dim or 4 * dim)
        self.ls2 = LayerScale(dim, 1e-5) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, pos: None = None) -> torch.Tensor:
        """`pos` is the encoder interface's position input; these blocks have none (positions were added
        to the tokens)."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 backbone built at img_size 518 (a 37x37 positional grid, resized at every forward), or
    with `dinov2=False` DINO v1's ViT. Implements models.encoder_interface.Encoder."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, num_register_tokens: int = 0,
                 ffn: str = "mlp", patch_size: int = 14, img_size: int = 518,
                 interpolate_offset: float = 0.1, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD,
                 dinov2: bool = True, mlp_hidden_dim: Optional[int] = None):
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if dinov2 else None
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, ffn, layer_scale=dinov2, hidden_dim=mlp_hidden_dim)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    def interpolate_pos_encoding(self, num_patches: int, h: int, w: int) -> torch.Tensor:
        """DINO's resize (v1 and v2 alike): bicubic, no antialias, scale factor (grid + 0.1) / side of the
        stored grid, the offset dodging floor() rounding the size down."""
        pos_embed = self.pos_embed
        n = pos_embed.shape[1] - 1
        if num_patches == n and h == w:
            return pos_embed
        pos_embed = pos_embed.float()
        side = int(math.sqrt(n))
        h0 = h // self.patch_size + self.interpolate_offset
        w0 = w // self.patch_size + self.interpolate_offset
        patch_pos = F.interpolate(
            pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2),
            scale_factor=(h0 / side, w0 / side), mode="bicubic", antialias=False)
        if patch_pos.shape[-2:] != (int(h0), int(w0)):
            raise RuntimeError(f"positional grid resized to {tuple(patch_pos.shape[-2:])}, "
                               f"expected {(int(h0), int(w0))}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(self.pos_embed.dtype)

    def prepare_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Tokens in the order [CLS, registers, patches]; registers get no positional embedding. The blocks
        take no position input (None)."""
        B, _, h, w = images.shape
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return x, None
