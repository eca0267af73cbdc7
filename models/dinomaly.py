"""Dinomaly: frozen encoder -> noisy MLP bottleneck -> linear-attention ViT decoder.

The decoder reconstructs two groups of encoder layers; the cosine distance between the encoder's and
the decoder's group features is the anomaly map. The paper's variants are switches of this file, off
in the recipe: feature jitter in the bottleneck, softmax attention or a ConvBlock as the decoder's
spatial mixer, and UniAD's neighbour mask for either attention. So are Dinomaly2's model changes
(RECIPE_V2): Context-Aware Recentering of the encoder targets, the two-stage bottleneck, and the RGB-D
modality (MVTec 3D-AD), where the frozen encoder's layers of an RGB image and its depth rendering are blended.
"""
import math
from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .dinov2 import Attention, Mlp
from .encoder_interface import Encoder
from .registry import default_target_layers


class FeatureJitter(nn.Module):
    """UniAD's feature jitter, in training only: x + N(0, 1) * scale * |x| / C per token."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x + torch.randn_like(x) * (x.norm(dim=-1, keepdim=True) / x.shape[-1]) * self.scale


class TwoStageBottleneck(nn.Module):
    """Dinomaly2's bottleneck: C -> width, dropout (`reduce`, which can train at its own rate); then
    width -> 4C, GELU, dropout, 4C -> C, dropout. No activation after the first layer, no input dropout."""

    def __init__(self, dim: int, width: int, dropout: float, jitter: float):
        super().__init__()
        self.jitter = FeatureJitter(jitter) if jitter > 0 else nn.Identity()
        self.reduce = nn.Linear(dim, width)
        self.fc1 = nn.Linear(width, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.reduce(self.jitter(x)))
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class NoisyBottleneck(nn.Module):
    """MLP C -> 4C -> C whose dropout (input, hidden and output) is the 'noise' that blocks identity
    mapping; `jitter` > 0 puts feature jitter in front (the Table A6 alternative, with dropout 0)."""

    def __init__(self, dim: int, dropout: float, jitter: float):
        super().__init__()
        self.jitter = FeatureJitter(jitter) if jitter > 0 else nn.Identity()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(self.drop(self.jitter(x)))))
        return self.drop(self.fc2(x))


def neighbour_mask(grid: tuple[int, int], size: int, prefix: int, device: torch.device) -> torch.Tensor:
    """N x N bool, True where attention is removed: for each patch query, the keys in the size x size
    square centred on it (itself included), clipped at the border; prefix tokens are never masked.
    UniAD's neighbour-masked attention, as the reference's generate_mask builds it."""
    h, w = grid
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= size // 2
    near_cols = (cols[:, None] - cols[None, :]).abs() <= size // 2
    patches = (near_rows[:, None, :, None] & near_cols[None, :, None, :]).reshape(h * w, h * w)
    mask = torch.zeros(prefix + h * w, prefix + h * w, dtype=torch.bool, device=device)
    mask[prefix:, prefix:] = patches
    return mask


class LinearAttention(nn.Module):
    """Linear attention with phi(x) = elu(x) + 1: no softmax, no scale.

    Its unfocused attention cannot single out the token it should copy, which keeps the decoder
    from learning an identity map. `eps` is added to the normaliser; the recipe has none (eps=0).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi(q), phi(k) and v, each B x heads x N x head_dim."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return F.elu(q) + 1.0, F.elu(k) + 1.0, v

    def _explicit_weights(self, q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        weights = q @ k.transpose(-2, -1)
        if mask is not None:  # the masked weights must be dropped before normalising
            weights = weights.masked_fill(mask, 0.0)
        return weights / (weights.sum(dim=-1, keepdim=True) + self.eps)

    def weights(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The effective attention weights, B x heads x N x N: w_ij = phi(q_i) phi(k_j)^T / (sum_j' phi(q_i)
        phi(k_j')^T + eps), keys under `mask` dropped first. forward mixes v with exactly these (without
        writing them out when there is no mask); with eps 0 each row sums to 1."""
        q, k, _ = self._features(x)
        return self._explicit_weights(q, k, mask)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._features(x)
        if mask is not None:  # the explicit N x N form
            return self.proj((self._explicit_weights(q, k, mask) @ v).transpose(1, 2).reshape(B, N, C))
        kv = torch.einsum("bhsd,bhse->bhde", k, v)
        normaliser = torch.einsum("bhsd,bhd->bhs", q, k.sum(dim=-2)) + self.eps
        x = torch.einsum("bhsd,bhde->bhse", q, kv) / normaliser.unsqueeze(-1)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ConvMixer(nn.Module):
    """The ConvBlock spatial mixer of Table A5 (MetaFormer's inverted separable conv, as the reference's
    SepConv): 1x1 conv to 2C (no bias), GELU, kernel x kernel depth-wise conv (no bias), 1x1 conv back.
    It sees only patch tokens: with it the decoder runs without class and register tokens."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.pwconv1 = nn.Linear(dim, 2 * dim, bias=False)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(2 * dim, 2 * dim, kernel, padding=kernel // 2, groups=2 * dim, bias=False)
        self.pwconv2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, _ = x.shape
        side = int(math.isqrt(N))
        x = self.act(self.pwconv1(x)).transpose(1, 2).reshape(B, -1, side, side)
        return self.pwconv2(self.dwconv(x).flatten(2).transpose(1, 2))


class DecoderBlock(nn.Module):
    """Pre-norm ViT block, LayerNorm eps 1e-8, no LayerScale, no drop-path, no dropout."""

    def __init__(self, dim: int, num_heads: int, attention: str, attn_eps: float, conv_kernel: int):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-8)
        self.norm1 = norm(dim)
        if attention == "linear":
            self.attn = LinearAttention(dim, num_heads, eps=attn_eps)
        elif attention == "softmax":
            self.attn = Attention(dim, num_heads)
        elif attention == "conv":
            self.attn = ConvMixer(dim, conv_kernel)
        else:
            raise ValueError(f"attention must be 'linear', 'softmax' or 'conv', got '{attention}'")
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def init_trainable(module: nn.Module) -> None:
    """The reference initialisation: Linear ~ truncated normal(std 0.01, +-0.03), bias 0; LayerNorm 1, 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(tensors), dim=1).mean(dim=1)


def check_architecture(encoder_depth: int, *, target_layers: Sequence[int], fuse_layer_encoder: Sequence[Sequence[int]],
                       fuse_layer_decoder: Sequence[Sequence[int]], decoder_depth: int, fuse_mode: str, recenter: bool,
                       attention: str, neighbor_mask: int, conv_kernel: int) -> None:
    """A ValueError naming the config key and its valid range for a combination Dinomaly cannot build. The
    config check (utils/config.validate) calls it with the encoder's depth from the registry, so a bad value
    fails before weights are read or a run directory exists; the constructor calls it for code that builds
    the model directly."""
    layers = list(target_layers)
    if not layers or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < encoder_depth:
        raise ValueError(f"target_layers {layers} must be strictly increasing block indices in 0..{encoder_depth - 1} "
                         f"(the encoder has {encoder_depth} blocks)")
    for key, groups, size, what in (("fuse_layer_encoder", fuse_layer_encoder, len(layers), "positions in target_layers"),
                                    ("fuse_layer_decoder", fuse_layer_decoder, decoder_depth, "decoder blocks")):
        if not groups or any(not group for group in groups) or any(not 0 <= i < size for g in groups for i in g):
            raise ValueError(f"{key} {[list(g) for g in groups]} must be non-empty groups of indices in "
                             f"0..{size - 1} (the {size} {what})")
    if len(fuse_layer_encoder) != len(fuse_layer_decoder):
        raise ValueError(f"fuse_layer_encoder and fuse_layer_decoder must have the same number of groups, got "
                         f"{len(fuse_layer_encoder)} and {len(fuse_layer_decoder)}")
    if recenter and fuse_mode == "concat":
        raise ValueError("recenter works on averaged groups (fuse_mode mean), not on fuse_mode concat")
    if fuse_mode == "concat" and len(fuse_layer_encoder) != 1:
        raise ValueError("fuse_mode concat (layer-to-cat-layer) takes one group in fuse_layer_encoder")
    if neighbor_mask and attention == "conv":
        raise ValueError("neighbor_mask applies to attention (linear or softmax), not to the conv mixer")
    if attention == "conv" and conv_kernel % 2 == 0:
        raise ValueError(f"conv_kernel must be odd (3, 5 or 7) to keep the patch grid, got {conv_kernel}")


class Dinomaly(nn.Module):
    """`forward(images)` returns (encoder_maps, decoder_maps): one B x C x h x w tensor per group.

    The values of every argument live in configs/base.yaml; `models.build_model(cfg)` passes them."""

    def __init__(self, encoder: Encoder, *, target_layers: Sequence[int],
                 fuse_layer_encoder: Sequence[Sequence[int]], fuse_layer_decoder: Sequence[Sequence[int]],
                 decoder_depth: int, dropout: float, attention: str, attn_eps: float, feature_jitter: float,
                 neighbor_mask: int, conv_kernel: int, fuse_mode: str, recenter: bool,
                 bottleneck: str, bottleneck_width: int, grad_checkpoint: bool = False, modality: str = "rgb",
                 rgb_ratio: float = 0.5):
        super().__init__()
        self.modality, self.rgb_ratio = modality, rgb_ratio
        check_architecture(len(encoder.blocks), target_layers=target_layers, fuse_layer_encoder=fuse_layer_encoder,
                           fuse_layer_decoder=fuse_layer_decoder, decoder_depth=decoder_depth, fuse_mode=fuse_mode,
                           recenter=recenter, attention=attention, neighbor_mask=neighbor_mask, conv_kernel=conv_kernel)
        self.recenter = recenter
        self.encoder = encoder.requires_grad_(False).eval()
        self.target_layers = list(target_layers)
        self.fuse_layer_encoder = [list(g) for g in fuse_layer_encoder]
        self.fuse_layer_decoder = [list(g) for g in fuse_layer_decoder]
        dim, heads = encoder.embed_dim, encoder.num_heads
        self.neighbor_mask = neighbor_mask
        # the conv mixer needs a square grid of patch tokens: class and register tokens never reach the decoder
        self.decoder_prefix = 0 if attention == "conv" else encoder.num_prefix_tokens
        self.fuse_mode = fuse_mode
        self.grad_checkpoint = grad_checkpoint
        self.bottleneck = (TwoStageBottleneck(dim, bottleneck_width, dropout, feature_jitter) if bottleneck == "two_stage"
                           else NoisyBottleneck(dim, dropout, feature_jitter))
        # layer-to-cat-layer (Table 5): the last decoder block, widened to the concatenated encoder layers
        self.projection = (nn.Linear(dim, dim * len(fuse_layer_encoder[0])) if fuse_mode == "concat"
                           else nn.Identity())
        self.decoder = nn.ModuleList([DecoderBlock(dim, heads, attention, attn_eps, conv_kernel)
                                      for _ in range(decoder_depth)])
        init_trainable(self.bottleneck)
        init_trainable(self.decoder)
        init_trainable(self.projection)

    @classmethod
    def from_config(cls, encoder: Encoder, cfg: dict) -> "Dinomaly":
        layers = cfg["target_layers"]
        layers = default_target_layers(len(encoder.blocks)) if layers == "auto" else layers
        return cls(encoder, target_layers=layers, fuse_layer_encoder=cfg["fuse_layer_encoder"],
                   fuse_layer_decoder=cfg["fuse_layer_decoder"], decoder_depth=cfg["decoder_depth"],
                   dropout=cfg["dropout"], attention=cfg["attention"], attn_eps=cfg["attn_eps"],
                   feature_jitter=cfg["feature_jitter"], neighbor_mask=cfg["neighbor_mask"],
                   conv_kernel=cfg["conv_kernel"], fuse_mode=cfg["fuse_mode"], recenter=cfg["recenter"],
                   bottleneck=cfg["bottleneck"], bottleneck_width=cfg["bottleneck_width"],
                   grad_checkpoint=cfg["grad_checkpoint"], modality=cfg["modality"], rgb_ratio=cfg["rgb_ratio"])

    def train(self, mode: bool = True) -> "Dinomaly":
        super().train(mode)
        self.encoder.eval()
        return self

    TRAINABLE_PARTS = ("bottleneck", "decoder", "projection")  # everything but the frozen encoder

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for part in self.TRAINABLE_PARTS for p in getattr(self, part).parameters()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The frozen half: (bottleneck input B x T x C, encoder group maps B x C x h x w each).

        Blocks past the last target layer never run. Both outputs depend only on the image, so they
        can be cached (--cache_features). With modality rgbd, `images` are B x 6 (RGB, depth rendering)."""
        x, pos = self.encoder.prepare_tokens(self._modalities_as_batch(images))
        layers = []
        for i, block in enumerate(self.encoder.blocks[: self.target_layers[-1] + 1]):
            x = block(x, pos)
            if i in self.target_layers:
                layers.append(self._blend(x))
        grid = (images.shape[-2] // self.encoder.patch_size, images.shape[-1] // self.encoder.patch_size)
        groups = [self._target(self._fuse([layers[i] for i in group])) for group in self.fuse_layer_encoder]
        return _mean(layers), [self._to_map(g, grid, 0) for g in groups]

    def _modalities_as_batch(self, images: torch.Tensor) -> torch.Tensor:
        """RGB-D (Dinomaly2's DinomalyRGBD): B x 6 -> 2B x 3, the RGB images then their depth renderings,
        so that one frozen pass encodes both."""
        if self.modality == "rgb":
            return images
        if images.shape[1] != 6:
            raise ValueError(f"modality rgbd takes B x 6 images (RGB, depth rendering), got {tuple(images.shape)}")
        return torch.cat([images[:, :3], images[:, 3:]], dim=0)

    def _blend(self, layer: torch.Tensor) -> torch.Tensor:
        """RGB-D: every token of a target layer as rgb_ratio x RGB + (1 - rgb_ratio) x depth; everything after
        (groups, recentering, bottleneck, decoder) sees only the blend."""
        if self.modality == "rgb":
            return layer
        rgb, depth = layer.chunk(2, dim=0)
        return self.rgb_ratio * rgb + (1 - self.rgb_ratio) * depth

    def _target(self, group: torch.Tensor) -> torch.Tensor:
        """A group's patch tokens; with `recenter` (Dinomaly2's Context-Aware Recentering) minus the group's
        class token, then a LayerNorm over channels without affine, eps 1e-8."""
        patches = group[:, self.encoder.num_prefix_tokens:]
        if not self.recenter:
            return patches
        return F.layer_norm(patches - group[:, :1], patches.shape[-1:], eps=1e-8)

    def _fuse(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """A group of layers as one target: their mean (the recipe) or, concat, side by side in channels."""
        return torch.cat(layers, dim=-1) if self.fuse_mode == "concat" else _mean(layers)

    def decode(self, fused: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """The trained half: bottleneck and decoder, grouped in reverse block order like the encoder."""
        x = self.bottleneck(fused[:, self.encoder.num_prefix_tokens - self.decoder_prefix:])
        mask = (neighbour_mask(grid, self.neighbor_mask, self.decoder_prefix, x.device) if self.neighbor_mask
                else None)
        layers = []
        for block in self.decoder:
            x = self._run_block(block, x, mask)
            layers.append(x)
        if self.fuse_mode == "concat":
            return [self._to_map(self.projection(x), grid, self.decoder_prefix)]
        layers = layers[::-1]
        return [self._to_map(_mean([layers[i] for i in group]), grid, self.decoder_prefix)
                for group in self.fuse_layer_decoder]

    def _run_block(self, block: DecoderBlock, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """A decoder block; with `grad_checkpoint`, when gradients are taken, its activations are not kept
        but recomputed in the backward pass (the same values: the RNG state is restored for the rerun)."""
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, x, mask, use_reentrant=False)
        return block(x, mask)

    def _to_map(self, tokens: torch.Tensor, grid: tuple[int, int], prefix: Optional[int] = None) -> torch.Tensor:
        """Strip CLS and register tokens (`prefix` of them); B x (h*w) x C -> B x C x h x w."""
        patches = tokens[:, self.encoder.num_prefix_tokens if prefix is None else prefix:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, *grid).contiguous()

    def forward(self, inputs: Union[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """inputs: images B x 3 x H x W, or the (bottleneck input, encoder group maps) that `encode`
        returned for them earlier (cached features)."""
        fused, en = self.encode(inputs) if isinstance(inputs, torch.Tensor) else inputs
        return en, self.decode(fused, tuple(en[0].shape[-2:]))
