"""The network: DINOv2 encoders (registry + loader) and the Dinomaly reconstruction model."""
from typing import Optional, Sequence

from .dinomaly import Dinomaly, LinearAttention
from .encoders import ENCODERS, build_encoder, load_encoder, load_state_dict_strict
from .vision_transformer import DinoVisionTransformer


def build_dinomaly(encoder: str, encoder_weights: Optional[str] = None,
                   target_layers: Sequence[int] = (2, 3, 4, 5, 6, 7, 8, 9),
                   fuse_layer_encoder: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6, 7)),
                   fuse_layer_decoder: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6, 7)),
                   decoder_depth: int = 8, dropout: float = 0.2, attention: str = "linear",
                   attn_eps: float = 0.0, weights_dir: Optional[str] = None) -> Dinomaly:
    """Frozen encoder `encoder` (weights: None = official download, a path, or "random") + trainable parts."""
    return Dinomaly(load_encoder(encoder, encoder_weights, weights_dir), target_layers, fuse_layer_encoder,
                    fuse_layer_decoder, decoder_depth, dropout, attention, attn_eps)


def build_from_config(cfg: dict) -> Dinomaly:
    return build_dinomaly(cfg["encoder"], cfg["encoder_weights"], cfg["target_layers"], cfg["fuse_layer_encoder"],
                          cfg["fuse_layer_decoder"], cfg["decoder_depth"], cfg["dropout"], cfg["attention"],
                          cfg["attn_eps"], cfg["weights_dir"])


__all__ = ["ENCODERS", "Dinomaly", "DinoVisionTransformer", "LinearAttention", "build_dinomaly",
           "build_encoder", "build_from_config", "load_encoder", "load_state_dict_strict"]
