"""What the reconstruction model needs from a frozen encoder: the one interface every family implements.

Dinomaly never looks inside an encoder beyond this. To add a family (another ViT, other weights),
write a module with these attributes and register a constructor for it in `models/registry.py`;
nothing in the training loop, the data pipeline or the decoder changes.

    tokens, pos = encoder.prepare_tokens(images)  # B x (prefix + h*w) x embed_dim, prefix tokens first
    for block in encoder.blocks:                  # block i's output is layer i (0-indexed)
        tokens = block(tokens, pos)
    patches = tokens[:, encoder.num_prefix_tokens:]   # the h x w grid, row-major

`images` are B x 3 x H x W, normalised with `mean`/`std`, with H and W multiples of `patch_size`.
`pos` is what the blocks need to know of positions on the grid (H / patch_size) x (W / patch_size), built
once per forward and handed to every block: each family decides where positions enter.
  - DINOv2, DINO v1 and its relatives add an interpolated absolute embedding to the tokens: pos is None;
  - BEiT adds a relative position bias to every attention's logits: pos is the grid side;
  - DINOv3 rotates queries and keys inside every attention (RoPE): pos is its (sin, cos).
A new family needs nothing else: the model, the caches and the decoder only run this loop.
"""
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

# The statistics every family is fed by default: the reference shares one ImageNet transform.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TIPS (google-deepmind/tips) takes images in [0, 1] as they are.
TIPS_MEAN = (0.0, 0.0, 0.0)
TIPS_STD = (1.0, 1.0, 1.0)


@runtime_checkable
class Encoder(Protocol):
    patch_size: int                     # pixels per patch side: the crop must be a multiple of it
    embed_dim: int                      # token width; the bottleneck and decoder take it
    num_heads: int                      # the decoder uses the encoder's head count
    num_prefix_tokens: int              # class + register tokens, stripped before the anomaly map
    mean: tuple[float, float, float]    # the input normalisation the data pipeline applies
    std: tuple[float, float, float]
    blocks: nn.ModuleList               # block(tokens, pos), applied in order, each keeps the token shape

    def prepare_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(patch embedding + prefix tokens [+ position embedding], the position input of every block)."""
        ...
