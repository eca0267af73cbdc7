"""Attention weights of the decoder's blocks and of the frozen encoder's, for the paper's figure that shows,
for chosen query points, where linear and softmax attention look (visualize_attention.py draws it).

    weights = attention_weights(block, tokens, pos, mask)   # B x heads x N x N; row i: query token i's weights
    per_block = block_attention(model, images)              # every decoder block beside its encoder block

Linear attention (the decoder of the recipe) has no N x N matrix in its forward pass; its effective weights
are phi(q_i) phi(k_j)^T / normaliser, phi = ELU + 1, as LinearAttention.weights writes them out. Softmax
attention (every encoder family, the decoder's softmax ablation) is read from the very queries, keys and
bias (BEiT's relative positions, DINOv3's rotated queries and keys) that its block hands to
F.scaled_dot_product_attention.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dinomaly import ConvMixer, Dinomaly, LinearAttention


@contextmanager
def _recorded_attention(calls: list) -> Iterator[None]:
    """Every F.scaled_dot_product_attention call made inside, recorded as (q, k, attn_mask, scale)."""
    fused = F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **options):
        if is_causal:
            raise ValueError("causal attention is not drawn")
        calls.append((q, k, attn_mask, scale))
        return fused(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **options)
    F.scaled_dot_product_attention = record
    try:
        yield
    finally:
        F.scaled_dot_product_attention = fused


def _softmax_weights(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor],
                     scale: Optional[float]) -> torch.Tensor:
    """The weights scaled_dot_product_attention applies: softmax(q k^T * scale + bias); a boolean mask keeps
    the keys where it is True."""
    logits = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(dim=-1)


@torch.no_grad()
def attention_weights(block: nn.Module, tokens: torch.Tensor, pos: Any = None,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention weights of `block` (a decoder block, or an encoder block of any family) on its input
    `tokens` (B x N x C, prefix tokens first), per head: B x heads x N x N, row i holding how much query
    token i takes from each token. `pos` is the encoder's position input of its blocks; `mask` the
    decoder's neighbour mask, applied as the forward pass applies it (linear attention drops the keys before
    normalising; softmax attention zeroes them after the softmax, as the reference does, so its rows then
    sum to less than 1). Without a mask (and with attn_eps 0) every row sums to 1."""
    x = block.norm1(tokens)
    if isinstance(block.attn, LinearAttention):
        return block.attn.weights(x, mask)
    if isinstance(block.attn, ConvMixer):
        raise ValueError("the conv mixer (attention: conv) has no attention weights to draw")
    calls = []
    with _recorded_attention(calls):
        block.attn(x, pos)
    if len(calls) != 1:
        raise RuntimeError(f"expected one attention call in {type(block.attn).__name__}, saw {len(calls)}")
    weights = _softmax_weights(*calls[0])
    return weights if mask is None else weights.masked_fill(mask, 0.0)


def paired_encoder_block(model: Dinomaly, decoder_block: int) -> Optional[int]:
    """The encoder block whose output decoder block `decoder_block` is trained to reconstruct, or None.

    The decoder's outputs are grouped in reverse order (model.decode): decoder block j is position
    depth-1-j of its fuse_layer_decoder group, and the encoder layer at the same position of the matching
    fuse_layer_encoder group is its pair. In the recipe, decoder block 0 pairs with encoder block 9 and
    block 7 with block 2."""
    reversed_index = len(model.decoder) - 1 - decoder_block
    for encoder_group, decoder_group in zip(model.fuse_layer_encoder, model.fuse_layer_decoder):
        if reversed_index in decoder_group and decoder_group.index(reversed_index) < len(encoder_group):
            return model.target_layers[encoder_group[decoder_group.index(reversed_index)]]
    return None


@dataclass
class BlockAttention:
    """One decoder block's head-averaged weights (B x N x N) beside its paired encoder block's (or None)."""
    decoder_block: int
    decoder: torch.Tensor
    encoder_block: Optional[int]
    encoder: Optional[torch.Tensor]


@torch.no_grad()
def block_attention(model: Dinomaly, images: torch.Tensor) -> list[BlockAttention]:
    """Every decoder block's attention weights on `images`, averaged over heads, beside those of the encoder
    block it reconstructs (paired_encoder_block). The model runs once in eval mode; each block's input is
    taken as the forward pass hands it over."""
    inputs = {}

    def keep(key):
        return lambda module, args: inputs.__setitem__(key, args)
    hooks = [block.register_forward_pre_hook(keep(("encoder", i))) for i, block in enumerate(model.encoder.blocks)]
    hooks += [block.register_forward_pre_hook(keep(("decoder", j))) for j, block in enumerate(model.decoder)]
    try:
        model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    result = []
    for j, block in enumerate(model.decoder):
        tokens, mask = inputs[("decoder", j)]
        paired = paired_encoder_block(model, j)
        encoder = None
        if paired is not None:
            encoder = attention_weights(model.encoder.blocks[paired], *inputs[("encoder", paired)]).mean(dim=1)
        result.append(BlockAttention(j, attention_weights(block, tokens, mask=mask).mean(dim=1), paired, encoder))
    return result
