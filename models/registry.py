"""Encoder registry: build a registered encoder (models/encoder_table.py) and load its weights, official
(cached or downloaded and verified, models/downloads.py) or a user's file, with strict key checking: a
checkpoint that does not match the architecture is an error (models/weights_file.py), never a half-loaded
encoder.
"""
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from .beit import BeitVisionTransformer
from .dinov2 import DinoVisionTransformer
from .dinov3 import DinoV3VisionTransformer
from .tips import TipsVisionTransformer
from .downloads import default_weights_dir, resolve_weights, sha256_of
from .encoder_interface import Encoder
from .encoder_table import DINOV3_FORM, ENCODERS, EncoderSpec, default_target_layers, get_spec
from .weights_file import (ZIP_MAGIC, WeightsError, check_state_dict, load_npz_file, load_state_dict_strict,
                           load_weights_file, what_is_wrong_with)

# The names this module has always offered, wherever they live now.
__all__ = ["DINOV3_FORM", "ENCODERS", "EncoderSpec", "WeightsError", "ZIP_MAGIC", "build_encoder",
           "check_encoder_weights", "check_state_dict", "default_target_layers", "default_weights_dir", "get_spec",
           "load_encoder", "load_npz_file", "load_state_dict_strict", "load_weights_file", "local_weights_path", "official_layout",
           "resolve_weights", "sha256_of", "what_is_wrong_with"]


def build_encoder(name: str) -> Encoder:
    spec = get_spec(name)
    if spec.family == "beit":
        return BeitVisionTransformer(spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size,
                                     spec.pos_grid * spec.patch_size, mean=spec.mean, std=spec.std)
    if spec.family == "tips":
        return TipsVisionTransformer(spec.embed_dim, spec.depth, spec.num_heads, spec.ffn, patch_size=spec.patch_size,
                                     img_size=spec.pos_grid * spec.patch_size, mean=spec.mean, std=spec.std,
                                     **spec.options)
    if spec.family == "dinov3":
        return DinoV3VisionTransformer(spec.embed_dim, spec.depth, spec.num_heads, num_storage_tokens=
                                       spec.num_register_tokens, patch_size=spec.patch_size, mean=spec.mean,
                                       std=spec.std, **spec.options)
    return DinoVisionTransformer(spec.embed_dim, spec.depth, spec.num_heads, spec.num_register_tokens, spec.ffn,
                                 spec.patch_size, spec.pos_grid * spec.patch_size, mean=spec.mean, std=spec.std,
                                 dinov2=spec.family == "dinov2")


def official_layout(spec: EncoderSpec, raw: dict, path: Path) -> dict:
    """The encoder's state dict out of an official file: unwrapped, prefix removed, extras dropped."""
    if spec.checkpoint_key is not None:
        if not isinstance(raw.get(spec.checkpoint_key), dict):
            raise WeightsError(f"encoder weights {path} should hold the weights under the key "
                               f"'{spec.checkpoint_key}' (the official {spec.family} layout); found keys: "
                               f"{', '.join(map(str, list(raw)[:8]))}")
        raw = raw[spec.checkpoint_key]
    state = {k[len(spec.prefix):] if spec.prefix and k.startswith(spec.prefix) else k: v for k, v in raw.items()}
    return {k: v for k, v in state.items() if not any(re.search(pattern, k) for pattern in spec.dropped)}


def local_weights_path(weights: Optional[str]) -> Optional[Path]:
    """The user's own weights file (None for official or random weights); a missing one is an error."""
    if weights in (None, "random"):
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    return path


def _encoder_state(name: str, weights: Optional[str], weights_dir: Optional[str], mmap: bool) -> tuple[dict, Path]:
    """The encoder's state dict from its file (local, or official: cached or downloaded) and the file."""
    path = local_weights_path(weights) or resolve_weights(name, weights_dir)
    if get_spec(name).family == "tips":  # Google's files are NumPy .npz archives
        raw = load_npz_file(path, "encoder weights", shapes_only=mmap)
    else:
        raw = load_weights_file(path, "encoder weights", mmap=mmap)
    if not isinstance(raw, dict):
        raise WeightsError(f"encoder weights {path} hold a {type(raw).__name__}, expected a state dict "
                           f"in the official layout of '{name}'")
    return official_layout(get_spec(name), raw, path), path


def check_encoder_weights(name: str, weights: Optional[str] = None, weights_dir: Optional[str] = None) -> None:
    """Everything load_encoder would refuse, found before a run starts: a missing file (or failed
    download), an unreadable one, another model's. Tensors are memory-mapped, not read."""
    if weights == "random":
        return
    state_dict, path = _encoder_state(name, weights, weights_dir, mmap=True)
    with torch.device("meta"):
        check_state_dict(build_encoder(name), state_dict, f"encoder weights {path} (for '{name}')")


def load_encoder(name: str, weights: Optional[str] = None, weights_dir: Optional[str] = None,
                 verbose: bool = True) -> Encoder:
    """Build encoder `name` and load its weights.

    weights: None for the official checkpoint (downloaded into `weights_dir` on first use), a path to
    a local file in the family's official layout, or "random" for an untrained encoder (tests and
    smoke runs only).
    """
    encoder = build_encoder(name)
    if weights == "random":
        warnings.warn(f"\n{'!' * 78}\n!! encoder '{name}' is RANDOMLY INITIALISED: results are meaningless "
                      f"for real data.\n!! Use this only for tests and smoke runs.\n{'!' * 78}", stacklevel=2)
        return encoder
    state_dict, path = _encoder_state(name, weights, weights_dir, mmap=False)
    load_state_dict_strict(encoder, state_dict, f"encoder weights {path} (for '{name}')")
    if verbose:
        print(f"Loaded encoder '{name}' from {path}", flush=True)
    return encoder
