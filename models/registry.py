"""Encoder registry: a name maps to an architecture, its official weights URL and known sha256.

Weights are fetched once into a cache directory, verified, and loaded with strict key checking:
a checkpoint that does not match the architecture is an error, never a half-loaded encoder.
"""
import hashlib
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .dinov2 import DinoVisionTransformer
from .encoder_interface import IMAGENET_MEAN, IMAGENET_STD, Encoder


class WeightsError(RuntimeError):
    """Encoder weights that cannot be used: not downloadable, corrupt, unreadable or of another model."""


_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/dinov2_vit{s}14{reg}_pretrain.pth"


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build an encoder and fetch its weights, without building it."""
    embed_dim: int
    depth: int
    num_heads: int
    num_register_tokens: int
    ffn: str = "mlp"
    url: Optional[str] = None
    sha256: Optional[str] = None
    patch_size: int = 14
    pos_grid: int = 37                    # side of the position-embedding grid stored in the weights
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def file_name(self) -> Optional[str]:
        return self.url.rsplit("/", 1)[-1] if self.url else None


_SIZES = {"small": ("s", 384, 12, 6, "mlp"), "base": ("b", 768, 12, 12, "mlp"),
          "large": ("l", 1024, 24, 16, "mlp"), "giant": ("g", 1536, 40, 24, "swiglu")}
_SHA256 = {
    "dinov2reg_vit_small_14": "f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb",
    "dinov2_vit_small_14": "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",
    "dinov2reg_vit_base_14": "73182a088cf94833c94b1666d1c99e02fe87e2007bff57b564fb6206e25dba71",
}

ENCODERS: dict[str, EncoderSpec] = {}
for _size, (_s, _dim, _depth, _heads, _ffn) in _SIZES.items():
    for _prefix, _reg in (("dinov2reg", 4), ("dinov2", 0)):
        _name = f"{_prefix}_vit_{_size}_14"
        ENCODERS[_name] = EncoderSpec(_dim, _depth, _heads, _reg, _ffn,
                                      _URL.format(s=_s, reg="_reg4" if _reg else ""), _SHA256.get(_name))
# A tiny architecture with no official weights: for the test-suite and the offline CPU demo only.
ENCODERS["dinov2_vit_tiny_14"] = EncoderSpec(embed_dim=64, depth=10, num_heads=2, num_register_tokens=0)
ENCODERS["dinov2reg_vit_tiny_14"] = EncoderSpec(embed_dim=64, depth=10, num_heads=2, num_register_tokens=4)
ENCODERS["dinov2_vit_tiny_16"] = EncoderSpec(embed_dim=64, depth=10, num_heads=2, num_register_tokens=0,
                                             patch_size=16, pos_grid=32)


def get_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{name}'; choose one of: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def build_encoder(name: str) -> Encoder:
    spec = get_spec(name)
    return DinoVisionTransformer(spec.embed_dim, spec.depth, spec.num_heads, spec.num_register_tokens, spec.ffn,
                                 spec.patch_size, spec.pos_grid * spec.patch_size, mean=spec.mean, std=spec.std)


def default_weights_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path) -> None:
    """Write to a temporary file next to `dest`, fsync, then rename: a broken download leaves no file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"Downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except (urllib.error.URLError, OSError) as error:
        tmp.unlink(missing_ok=True)
        raise WeightsError(
            f"could not download the encoder weights from {url} ({error}). Offline? Download that file by hand "
            f"and put it at {dest} (the file name must be {dest.name}), or pass --encoder_weights PATH to a "
            f"local copy") from None
    os.replace(tmp, dest)


def resolve_weights(name: str, weights_dir: Optional[str] = None) -> Path:
    """Path of the official checkpoint in the cache, downloading and verifying it as needed."""
    spec = get_spec(name)
    if spec.url is None:
        raise WeightsError(f"encoder '{name}' has no official weights; pass --encoder_weights PATH "
                           f"or --encoder_weights random")
    path = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    path = path / spec.file_name
    if not path.exists():
        _download(spec.url, path)
    if spec.sha256 is not None:
        actual = sha256_of(path)
        if actual != spec.sha256:
            raise WeightsError(f"sha256 mismatch for {path}: expected {spec.sha256}, got {actual}. "
                               f"The file is corrupt or not {spec.file_name}; delete it to download again.")
    return path


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Load with every key and shape checked; the one-line error lists what differs and names the file."""
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{source} is not a flat state dict of tensors: '{not_tensors[0]}' holds a "
                           f"{type(state_dict[not_tensors[0]]).__name__}")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
                 for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", mismatched)) if items]
        raise WeightsError(f"{source} does not match the architecture: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def load_weights_file(path: Path, what: str, error: type = WeightsError):
    """torch.load of a file a user hands us: weights_only=True, and an unreadable file is `error` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as failure:
        reason = str(failure).strip().splitlines()[0]
        raise error(f"could not read {what} {path} (not a checkpoint, or corrupt): {reason}") from None


def load_encoder(name: str, weights: Optional[str] = None, weights_dir: Optional[str] = None,
                 verbose: bool = True) -> Encoder:
    """Build encoder `name` and load its weights.

    weights: None for the official checkpoint (downloaded into `weights_dir` on first use), a path to
    a local file in Meta's layout, or "random" for an untrained encoder (tests and smoke runs only).
    """
    encoder = build_encoder(name)
    if weights == "random":
        warnings.warn(f"\n{'!' * 78}\n!! encoder '{name}' is RANDOMLY INITIALISED: results are meaningless "
                      f"for real data.\n!! Use this only for tests and smoke runs.\n{'!' * 78}", stacklevel=2)
        return encoder
    path = Path(weights).expanduser() if weights else resolve_weights(name, weights_dir)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    state_dict = load_weights_file(path, "encoder weights")
    if not isinstance(state_dict, dict):
        raise WeightsError(f"encoder weights {path} hold a {type(state_dict).__name__}, expected a state dict "
                           f"in Meta's layout")
    load_state_dict_strict(encoder, state_dict, f"encoder weights {path} (for '{name}')")
    if verbose:
        print(f"Loaded encoder '{name}' from {path}", flush=True)
    return encoder
