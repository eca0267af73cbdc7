"""TIPS image encoders (Google DeepMind, google-deepmind/tips, pytorch/image_encoder.py), written to load
Google's released .npz files key for key and to compute what Google's PyTorch code computes.

A TIPS ViT is DINOv2's ViT (models/dinov2.py: pre-norm blocks, LayerNorm eps 1e-6, qkv bias, LayerScale,
exact-GELU MLP or the fused SwiGLU for g) with what Google's inference code sets differently:
  - one register token (the "second CLS" of TIPS), inserted after the class token without a position;
  - the position grid is stored for 448 px (32 x 32; 16 x 16 for the 224-px g/14 low-res file) and resized
    like Google's code, bilinear with antialias to exactly (H / 14, W / 14), where DINOv2 resizes bicubically
    by a scale factor with a +0.1 offset;
  - the So400m width's MLP is 4304 wide (mlp_ratio 4304 / 1152);
  - images are fed in [0, 1]: mean 0, std 1 (run_image_encoder_inference.py).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .dinov2 import DinoVisionTransformer
from .encoder_interface import TIPS_MEAN, TIPS_STD


class TipsVisionTransformer(DinoVisionTransformer):
    """A TIPS ViT backbone; implements models.encoder_interface.Encoder like DINOv2's (pos is None)."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, ffn: str = "mlp",
                 mlp_hidden_dim: Optional[int] = None, patch_size: int = 14, img_size: int = 448,
                 mean: tuple = TIPS_MEAN, std: tuple = TIPS_STD):
        super().__init__(embed_dim, depth, num_heads, num_register_tokens=1, ffn=ffn, patch_size=patch_size,
                         img_size=img_size, mean=mean, std=std, mlp_hidden_dim=mlp_hidden_dim)

    def interpolate_pos_encoding(self, num_patches: int, h: int, w: int) -> torch.Tensor:
        """Google's resize (interpolate_offset 0, interpolate_antialias True): the stored grid, bilinear with
        antialias, to exactly (h / patch, w / patch); unchanged when the grid is already that, square."""
        pos_embed = self.pos_embed
        n = pos_embed.shape[1] - 1
        if num_patches == n and h == w:
            return pos_embed
        pos_embed = pos_embed.float()
        side = int(n ** 0.5)
        patch_pos = F.interpolate(pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2),
                                  size=(h // self.patch_size, w // self.patch_size), mode="bilinear",
                                  antialias=True)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(self.pos_embed.dtype)
