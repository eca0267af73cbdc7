"""The network: the encoder registry and loader, the encoder interface, and the Dinomaly model."""
from .dinomaly import Dinomaly, LinearAttention
from .encoder_interface import IMAGENET_MEAN, IMAGENET_STD, Encoder
from .registry import ENCODERS, build_encoder, get_spec, load_encoder, load_state_dict_strict


def build_model(cfg: dict) -> Dinomaly:
    """The frozen encoder `cfg["encoder"]` with its weights (`encoder_weights`: None = official download,
    a path, or "random") and the trainable bottleneck and decoder, all from one validated config."""
    encoder = load_encoder(cfg["encoder"], cfg["encoder_weights"], cfg["weights_dir"])
    return Dinomaly.from_config(encoder, cfg)


def input_normalization(cfg: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the data pipeline normalises images with: ImageNet's for every encoder (the
    reference shares one transform), or with input_norm: encoder, those its weights were trained with."""
    if cfg["input_norm"] == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    spec = get_spec(cfg["encoder"])
    return spec.mean, spec.std


__all__ = ["ENCODERS", "Dinomaly", "Encoder", "IMAGENET_MEAN", "IMAGENET_STD", "LinearAttention", "build_encoder",
           "build_model", "get_spec", "input_normalization", "load_encoder", "load_state_dict_strict"]
