"""BEiT / BEiT v2 ViT (microsoft/unilm), as the reference runs them: written to load the official
fine-tuned checkpoints key for key.

What differs from the DINO ViTs: no absolute position embedding; a relative position bias table in
every block, added to the attention logits; LayerScale (`gamma_1`, `gamma_2`); and q and v biases
with no k bias. The reference builds the model for 224-pixel inputs (a 14 x 14 grid) and cannot run
other sizes. Here the bias is built for the grid of each input: at 14 x 14 it is exactly the
reference's; at other grids the (2*14-1) x (2*14-1) table is resized bicubically (align_corners=False)
to (2g-1) x (2g-1), keeping the three entries for the class token.
"""
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dinov2 import Mlp, PatchEmbed
from .encoder_interface import IMAGENET_MEAN, IMAGENET_STD


@lru_cache(maxsize=8)
def relative_position_index(grid: int) -> torch.Tensor:
    """(g*g+1) x (g*g+1) indices into a table of (2g-1)^2 patch offsets + 3 class-token entries
    (class->patch, patch->class, class->class), as BEiT's gen_relative_position_index."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    distances = (2 * grid - 1) ** 2
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = relative[..., 0] * (2 * grid - 1) + relative[..., 1]
    index[0, :] = distances
    index[:, 0] = distances + 1
    index[0, 0] = distances + 2
    return index


def resize_bias_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """The table of a (2s-1)^2 offset window resized to (2g-1)^2; the 3 class-token rows are kept."""
    side = int((table.shape[0] - 3) ** 0.5)
    if side == 2 * grid - 1:
        return table
    patches = table[:-3].T.reshape(1, -1, side, side)
    resized = F.interpolate(patches.float(), size=(2 * grid - 1, 2 * grid - 1), mode="bicubic", align_corners=False)
    return torch.cat((resized.reshape(table.shape[1], -1).T.to(table.dtype), table[-3:]))


class BeitAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2 + 3, num_heads))
        self.proj = nn.Linear(dim, dim)

    def position_bias(self, grid: int) -> torch.Tensor:
        table = resize_bias_table(self.relative_position_bias_table, grid)
        index = relative_position_index(grid).to(table.device)
        return table[index.view(-1)].view(index.shape[0], index.shape[1], -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # no k bias
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias(grid).unsqueeze(0).to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class BeitBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = BeitAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma_1 = nn.Parameter(torch.full((dim,), 1e-5))
        self.gamma_2 = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x), grid)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class BeitVisionTransformer(nn.Module):
    """BEiT backbone of the official fine-tuned files (mean-pooled: `fc_norm`, no final `norm`).
    Implements models.encoder_interface.Encoder."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int = 16, img_size: int = 224,
                 mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([BeitBlock(embed_dim, num_heads, img_size // patch_size) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def prepare_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """[CLS, patches] and the grid side, from which each block builds its relative position bias."""
        if images.shape[-2] != images.shape[-1]:
            raise ValueError(f"BEiT's relative position bias needs square inputs, got {tuple(images.shape[-2:])}")
        x = self.patch_embed(images)
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1), images.shape[-1] // self.patch_size
