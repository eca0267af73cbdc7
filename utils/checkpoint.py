"""Checkpoints: written atomically, read with weights_only=True, checked against the architecture."""
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import Dinomaly, build_from_config, load_state_dict_strict
from models.encoders import load_weights_file
from .config import validate

FORMAT = "dinomaly-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, of another format or of another architecture."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file, fsync, then rename over `path`: a crash mid-write never leaves a
    truncated file under the real name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = load_weights_file(path, "checkpoint", CheckpointError)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Dinomaly checkpoint of this repository (format {FORMAT})")
    validate(checkpoint["config"], f"config saved in {path}")
    checkpoint["path"] = str(path)
    return checkpoint


def load_trainable(model: Dinomaly, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load bottleneck and decoder weights saved by `Dinomaly.trainable_state_dict`."""
    stray = [k for k in state_dict if not k.startswith(("bottleneck.", "decoder."))]
    if stray:
        raise CheckpointError(f"{source} has unexpected keys: {', '.join(stray[:8])}")
    for part in ("bottleneck", "decoder"):
        prefix = f"{part}."
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            load_state_dict_strict(getattr(model, part), sub, f"{source} ({part})")
        except RuntimeError as error:
            raise CheckpointError(str(error)) from None


def model_from_checkpoint(checkpoint: dict[str, Any], config: dict[str, Any] = None) -> Dinomaly:
    """Rebuild the model from the checkpoint's config (or `config`) and load its trained weights."""
    model = build_from_config(config or checkpoint["config"])
    load_trainable(model, checkpoint["model"], f"checkpoint {checkpoint['path']}")
    return model


def capture_rng() -> dict[str, Any]:
    """Every random state that training draws from, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
